"""Lazy partitions (:class:`fl_privsim.core.partition.Partitions`) give the indices the eager
partitioner gave before them, and a federation's partitions hold no per-client array."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fl_privsim.core.config import load
from fl_privsim.core.partition import Partitions, partition, partitions
from fl_privsim.core.seeding import numpy_rng
from fl_privsim.engine.federated_data import federated_data

LABELS = np.repeat(np.arange(10), 100)


def _digest(parts: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(np.asarray(p, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


# Digests of the eager partitioner's output (fl_privsim.core.partition before it became lazy,
# commit 05b6e32), for the same labels: the lazy one must reproduce it index for index.
EAGER_DIGESTS = [
    (7, "dirichlet", 0.5, 3, "88e20be4ae819486"),
    (100, "dirichlet", 5.0, 0, "b65d0d32640a30d9"),
    (1000, "iid", 0.5, 0, "4277028ef499ab79"),
    (13, "iid", 0.5, 2, "73a262d2180dd3f2"),
]


@pytest.mark.parametrize(("k", "scheme", "alpha", "seed", "digest"), EAGER_DIGESTS)
def test_same_indices_as_the_eager_partitioner(k, scheme, alpha, seed, digest) -> None:
    lazy = partitions(LABELS, k, scheme=scheme, alpha=alpha, seed=seed)
    assert len(lazy) == k
    assert _digest(list(lazy)) == digest
    assert _digest(partition(LABELS, k, scheme=scheme, alpha=alpha, seed=seed)) == digest


@pytest.mark.parametrize(("n", "k"), [(1000, 7), (1437, 1000), (50, 50), (30162, 10000)])
def test_iid_matches_the_array_split_formula(n: int, k: int) -> None:
    """The eager iid formula: a seeded permutation cut by ``np.array_split``, each part sorted."""
    labels = np.zeros(n, dtype=np.int64)
    expected = np.array_split(numpy_rng(5, "partition").permutation(n), k)
    lazy = partitions(labels, k, seed=5)
    for i in (0, k // 2, k - 1):
        assert np.array_equal(lazy[i], np.sort(expected[i]))
    assert np.array_equal(lazy.sizes(), [len(p) for p in expected])


def test_parts_are_views_of_one_array_and_cycle() -> None:
    lazy = partitions(LABELS, 4, seed=0)
    assert lazy[1].base is lazy.flat
    assert np.array_equal(lazy[-1], lazy[3])
    cycled = lazy.cycled(10)
    assert len(cycled) == 10 and np.array_equal(cycled[9], lazy[1])
    with pytest.raises(IndexError):
        cycled[10]
    assert [len(p) for p in lazy[1:3]] == [250, 250]


def test_eager_partition_returns_writable_copies() -> None:
    parts = partition(LABELS, 3, seed=0)
    parts[0][0] = -1  # the caller's own array
    assert partition(LABELS, 3, seed=0)[0][0] != -1


def test_federation_partitions_are_lazy_and_unchanged() -> None:
    cfg = load(None, overrides=["federation.num_clients=1000", "federation.clients_per_round=10"])
    fed = federated_data(cfg)
    assert isinstance(fed.train_parts, Partitions) and isinstance(fed.test_parts, Partitions)
    assert len(fed.train_parts) == len(fed.test_parts) == 1000
    eager = partition(fed.data.train_y.numpy(), 1000, seed=cfg.seed)
    assert all(np.array_equal(fed.train_parts[i], eager[i]) for i in (0, 1, 500, 999))
    n_test = min(1000, len(fed.data.test_y))
    tests = partition(fed.data.test_y.numpy(), n_test, seed=cfg.seed + 1)
    assert np.array_equal(fed.test_parts[999], tests[999 % n_test])
