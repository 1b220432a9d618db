"""Partitioners, the stratified train/test split and the seeded batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_privsim.core.data import partition, sample_batch
from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.partition import train_test_indices
from fl_privsim.core.seeding import torch_generator

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, 10 balanced classes


def _mean_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    out = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n))  # each index exactly once
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted ascending


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_deterministic_and_seed_dependent(scheme: str) -> None:
    a = partition(LABELS, 7, scheme=scheme, alpha=0.5, seed=3)
    b = partition(LABELS, 7, scheme=scheme, alpha=0.5, seed=3)
    c = partition(LABELS, 7, scheme=scheme, alpha=0.5, seed=4)
    assert len(a) == 7
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    _assert_exact_cover(a, len(LABELS))


def test_iid_sizes_are_near_equal() -> None:
    parts = partition(LABELS, 7, scheme="iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000


def test_dirichlet_small_alpha_is_skewed() -> None:
    iid = partition(LABELS, 10, scheme="iid", seed=0)
    skew = partition(LABELS, 10, scheme="dirichlet", alpha=0.1, seed=0)
    near_iid = partition(LABELS, 10, scheme="dirichlet", alpha=1000.0, seed=0)
    h_iid, h_skew = _mean_entropy(iid, LABELS), _mean_entropy(skew, LABELS)
    assert h_iid > 0.95 * np.log(10)  # nearly uniform labels per client
    assert h_skew < 0.6 * h_iid  # few classes per client
    assert _mean_entropy(near_iid, LABELS) > 0.95 * np.log(10)
    assert min(len(p) for p in skew) >= 1


def test_dirichlet_min_size_and_tiny_alpha() -> None:
    parts = partition(LABELS, 10, scheme="dirichlet", alpha=0.01, seed=1, min_size=5)
    assert min(len(p) for p in parts) >= 5
    _assert_exact_cover(parts, len(LABELS))


def test_dirichlet_gives_up_with_advice() -> None:
    with pytest.raises(DataError, match="fewer clients.*larger alpha"):
        partition(np.zeros(20, dtype=int), 20, scheme="dirichlet", alpha=0.01, min_size=1)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=200),
    data=st.data(),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    seed=st.integers(0, 2**31),
)
def test_partition_covers_every_index_once(
    labels: list[int], data: st.DataObject, scheme: str, seed: int
) -> None:
    arr = np.asarray(labels)
    k = data.draw(st.integers(1, min(len(arr), 12)), label="num_clients")
    alpha = data.draw(st.floats(0.05, 100.0), label="alpha")
    parts = partition(arr, k, scheme=scheme, alpha=alpha, seed=seed, min_size=0)
    assert len(parts) == k
    _assert_exact_cover(parts, len(arr))


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        partition(LABELS, 0)
    with pytest.raises(ConfigError, match="num_clients.*1001.*1000"):
        partition(LABELS, 1001)
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            partition(LABELS, 3, scheme="dirichlet", alpha=alpha)
    with pytest.raises(ConfigError, match="iid.*dirichlet"):
        partition(LABELS, 3, scheme="pathological")
    with pytest.raises(ConfigError, match="min_size"):
        partition(LABELS, 10, min_size=101)
    with pytest.raises(DataError, match="1-D"):
        partition(LABELS.reshape(10, 100), 3)


def test_train_test_indices_stratified() -> None:
    tr, te = train_test_indices(LABELS, test_fraction=0.25, seed=0)
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1000))
    assert np.bincount(LABELS[te]).tolist() == [25] * 10
    tr2, te2 = train_test_indices(LABELS, test_fraction=0.25, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, train_test_indices(LABELS, test_fraction=0.25, seed=1)[1])
    # a class with one example keeps it for training
    tr, te = train_test_indices(np.array([0, 0, 0, 0, 1]), test_fraction=0.5, seed=0)
    assert 4 in tr and len(te) == 2


def test_sample_batch_deterministic_without_replacement() -> None:
    part = np.arange(100, 150)
    a = sample_batch(part, 16, torch_generator(0, 1, 2, "batch"))
    b = sample_batch(part, 16, torch_generator(0, 1, 2, "batch"))
    c = sample_batch(part, 16, torch_generator(0, 2, 2, "batch"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 16 and set(a) <= set(part)
    gen = torch_generator(0, 1, 2, "batch")
    expected = part[torch.randperm(50, generator=gen)[:16].numpy()]
    assert np.array_equal(a, expected)
    whole = sample_batch(part, 50, torch_generator(5, "batch"))
    assert np.array_equal(np.sort(whole), part)


def test_sample_batch_errors() -> None:
    with pytest.raises(DataError, match="batch_size \\(11\\).*10 examples"):
        sample_batch(np.arange(10), 11, torch_generator(0, "batch"))
    with pytest.raises(ConfigError, match="batch_size"):
        sample_batch(np.arange(10), 0, torch_generator(0, "batch"))
