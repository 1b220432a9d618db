"""Split a dataset's training indices among simulated clients, and draw client batches.

Schemes of :func:`partition`:

- ``iid``: a seeded shuffle cut into ``num_clients`` near-equal parts.
- ``dirichlet``: label skew after Hsu, Qi & Brown (2019), "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification": for every class, the
  shares of its examples across the clients are drawn from Dirichlet(alpha * 1). A small
  ``alpha`` (0.1) leaves each client with few classes; a large one (100) is close to iid.
  Shares are redrawn until every client holds at least ``min_size`` examples.

Both are deterministic given ``seed`` (through ``fl_privsim.core.seeding.numpy_rng(seed,
"partition")``), give every index to exactly one client and return each client's indices
sorted ascending. :func:`sample_batch` draws one batch from a client's indices with an
explicit ``torch.Generator``, so a scorer can redraw the same batch from the same seed.
:func:`train_test_indices` is the stratified train/test split the dataset loaders use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np
import torch

from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.seeding import numpy_rng

__all__ = ["SCHEMES", "Partitions", "partition", "partitions", "sample_batch", "train_test_indices"]

logger = logging.getLogger(__name__)

#: Partition schemes understood by :func:`partition`.
SCHEMES: tuple[str, ...] = ("iid", "dirichlet")

#: How many Dirichlet draws :func:`partition` tries before giving up on ``min_size``.
MAX_DIRICHLET_DRAWS = 1000


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class Partitions(Sequence[np.ndarray]):
    """Every client's indices, held as one flat array cut at ``offsets``: client ``i`` owns
    ``flat[offsets[i]:offsets[i + 1]]`` (a view, sorted ascending: treat it as read-only, as
    every client's part shares the one array). No per-client
    array exists until a client's part is asked for, so 10 000 clients cost one int64 per
    example plus one offset per client. With ``length`` > the number of parts, client ``i``
    gets part ``i % parts`` (the local test shards when clients outnumber test examples)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, length: int | None = None) -> None:
        self.flat = np.asarray(flat, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.parts = len(self.offsets) - 1
        self.length = self.parts if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.length))]
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"client {i} out of range (0..{self.length - 1})")
        j = i % self.parts
        return self.flat[self.offsets[j] : self.offsets[j + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self.length))

    def sizes(self) -> np.ndarray:
        """Each part's size (``parts`` values)."""
        return np.diff(self.offsets)

    def cycled(self, length: int) -> Partitions:
        """The same parts for ``length`` clients, client ``i`` getting part ``i % parts``."""
        return Partitions(self.flat, self.offsets, length)


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split the indices ``0 .. len(labels)-1`` among ``num_clients`` clients.

    Parameters
    ----------
    labels
        1-D array of integer class labels, one per training example.
    num_clients
        Number of clients, ``1 <= num_clients <= len(labels)``.
    scheme
        ``"iid"`` or ``"dirichlet"`` (see the module docstring).
    alpha
        Dirichlet concentration (> 0); used by ``"dirichlet"``, validated always.
    seed
        Root seed; the same seed gives the same partition.
    min_size
        Least number of examples every client must hold (>= 0).

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` int64 arrays of indices, each sorted ascending; together they hold
        every index exactly once.

    Raises
    ------
    ConfigError
        For an unknown scheme or an out-of-range ``num_clients``, ``alpha`` or ``min_size``.
    DataError
        If ``labels`` is not 1-D, or no Dirichlet draw in :data:`MAX_DIRICHLET_DRAWS` gives
        every client ``min_size`` examples.
    """
    parts = partitions(
        labels, num_clients, scheme=scheme, alpha=alpha, seed=seed, min_size=min_size
    )
    return [part.copy() for part in parts]


def partitions(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> Partitions:
    """:func:`partition` as a lazy :class:`Partitions` (same arguments, checks and indices:
    ``list(partitions(...)) == partition(...)`` element for element), without one array per
    client."""
    labels = np.asarray(labels)
    _check(labels, num_clients, scheme, alpha, min_size)
    n = len(labels)
    rng = numpy_rng(seed, "partition")
    if scheme == "iid":
        perm = rng.permutation(n)
        # np.array_split's cut: the first n % k parts get one example more
        each, extra = divmod(n, num_clients)
        sizes = np.full(num_clients, each, dtype=np.int64)
        sizes[:extra] += 1
        owner = np.repeat(np.arange(num_clients), sizes)
        flat = perm[np.lexsort((perm, owner))]  # each part sorted ascending, parts in order
        return Partitions(flat, np.concatenate(([0], np.cumsum(sizes))))
    return _dirichlet(labels, num_clients, float(alpha), min_size, rng)


def _check(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, min_size: int) -> None:
    """Raise for arguments :func:`partition` refuses (see its docstring)."""
    if labels.ndim != 1:
        raise DataError(f"partition: labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}"
        )
    if not _is_int(num_clients) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > n:
        raise ConfigError(
            f"num_clients ({num_clients}) exceeds the number of training examples ({n})"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.number))
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise ConfigError(f"partition alpha must be a finite number > 0, got {alpha!r}")
    if not _is_int(min_size) or min_size < 0:
        raise ConfigError(f"partition min_size must be an integer >= 0, got {min_size!r}")
    if min_size * num_clients > n:
        raise ConfigError(
            f"cannot give each of {num_clients} clients min_size={min_size} examples "
            f"out of {n}; use fewer clients or a smaller min_size"
        )


def _dirichlet(
    labels: np.ndarray, k: int, alpha: float, min_size: int, rng: np.random.Generator
) -> Partitions:
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    owner = np.empty(len(labels), dtype=np.int64)
    clients = np.arange(k)
    for _ in range(MAX_DIRICHLET_DRAWS):
        for idx in by_class:
            shares = rng.dirichlet(np.full(k, alpha))
            if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # defensive, tiny alpha
                shares = np.eye(k)[rng.integers(k)]
            cuts = np.floor(np.cumsum(shares) * len(idx)).astype(np.int64)
            cuts[-1] = len(idx)
            owner[idx] = np.repeat(clients, np.diff(cuts, prepend=0))
        sizes = np.bincount(owner, minlength=k)
        if sizes.min() >= min_size:
            order = np.argsort(owner, kind="stable")  # stable: indices stay ascending
            return Partitions(order, np.concatenate(([0], np.cumsum(sizes))))
    raise DataError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_DRAWS} gave each of {k} clients at "
        f"least {min_size} examples (alpha={alpha}, {len(labels)} examples); use fewer "
        "clients, a larger alpha or a smaller min_size"
    )


def effective_batch_size(batch_size: int, partition_size: int) -> int:
    """The batch a client really draws: ``client.batch_size``, clamped to the ``partition_size``
    examples it holds. The one place the configured batch size is clamped: the client's batch
    drawing, its defenses' expected batch size (DP accounting) and the scorer's reproduction of
    the batch all call it, so they agree."""
    return min(int(batch_size), int(partition_size))


def sample_batch(
    partition_indices: np.ndarray, batch_size: int, generator: torch.Generator
) -> np.ndarray:
    """Draw ``batch_size`` distinct indices from one client's partition.

    Parameters
    ----------
    partition_indices
        The client's dataset indices (as returned by :func:`partition`).
    batch_size
        Number of indices to draw, ``1 <= batch_size <= len(partition_indices)``.
    generator
        Seeded generator (e.g. ``seeding.torch_generator(seed, round, client, "batch")``);
        the draw is ``torch.randperm(len, generator=generator)[:batch_size]``, so the same
        generator state gives the same batch.

    Returns
    -------
    numpy.ndarray
        int64 dataset indices, in draw order (not sorted), without repetition.
    """
    indices = np.asarray(partition_indices, dtype=np.int64).reshape(-1)
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size > len(indices):
        raise DataError(
            f"batch_size ({batch_size}) exceeds the client's {len(indices)} examples; "
            "use a smaller batch_size or fewer clients"
        )
    order = torch.randperm(len(indices), generator=generator, device=generator.device)
    batch: np.ndarray = indices[order[:batch_size].cpu().numpy()]
    return batch


def train_test_indices(
    labels: np.ndarray, *, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded train/test split of ``0 .. len(labels)-1``.

    Each class gives ``round(n_c * test_fraction)`` of its examples to the test split, but
    always keeps at least one for training. Deterministic from ``seed`` (purpose ``"split"``).

    Returns
    -------
    tuple of numpy.ndarray
        ``(train_idx, test_idx)``, int64, disjoint, each sorted ascending, covering every index.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    rng = numpy_rng(seed, "split")
    test = [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: min(int(len(idx) * test_fraction + 0.5), len(idx) - 1)])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), test_idx), test_idx
