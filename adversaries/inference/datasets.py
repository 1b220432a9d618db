"""Data of the inference games: a challenger pool, a disjoint auxiliary pool, a pretraining set.

- ``adult``: UCI Adult (``adult.data.gz`` and ``adult.test.gz`` in ``root``; CC BY 4.0),
  read and encoded by :func:`fl_privsim.core.tabular.load_adult` (shared with the federation).
  Features: age, education-num, hours-per-week, log1p capital gain/loss (standardised with
  the training rows' statistics) and one-hot workclass, marital status, occupation,
  relationship, native country ("?" is its own category); the two sensitive attributes are
  binary columns: ``sex`` (1 = Female) and ``race`` (1 = not White; Adult's five race values
  binarised so that the attribute game flips one column). Label: income > 50K. The training
  file is shuffled with the seed and cut into the challenger pool and the auxiliary pool; the
  test file pretrains the global model. ``a`` is the chosen sensitive attribute.
- ``digits`` (offline default) and ``cifar10_npz``: images of :mod:`fl_privsim.core.data`,
  normalised with the training statistics; the property is "label = ``property_class``"
  (presence of a class, as in Melis et al., S&P 2019). Train split → pools, test split →
  pretraining.
- ``utkface``: faces of ``../shared/data/utkface`` (never shipped), sensitive ``gender`` or
  ``race`` (1 = not White); see :mod:`adversaries.inference.utkface`.

Auxiliary distribution shift (an uncertainty of the adversary in Li et al., arXiv:2408.16913):
``aux_attribute_rate`` > 0 subsamples the auxiliary pool so that this fraction has a = 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adversaries.inference.utkface import load_utkface_game
from fl_privsim.core.data import load_dataset
from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.seeding import numpy_rng
from fl_privsim.core.tabular import ADULT_COLUMNS, ADULT_SENSITIVE, load_adult

logger = logging.getLogger(__name__)

__all__ = ["ADULT_COLUMNS", "GAME_DATASETS", "GameData", "load_adult", "load_game_data"]

GAME_DATASETS: tuple[str, ...] = ("adult", "digits", "cifar10_npz", "utkface")
SENSITIVE = {"adult": ADULT_SENSITIVE, "utkface": ("gender", "race")}  # utkface: see utkface.py


@dataclass(frozen=True, eq=False)
class GameData:
    """Pools of one game. ``x_*`` are float32 model inputs, ``y_*`` int64 labels, ``a_*``
    int64 0/1 (the sensitive attribute or property P). ``attr_column`` is the flat input
    column holding the attribute (tabular data; ``None`` for images)."""

    name: str
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    a_pool: torch.Tensor
    x_aux: torch.Tensor
    y_aux: torch.Tensor
    a_aux: torch.Tensor
    x_pre: torch.Tensor
    y_pre: torch.Tensor
    input_shape: tuple[int, int, int]
    num_classes: int
    attr_column: int | None
    attribute: str

    def with_attribute(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Copies of records ``x`` with their sensitive attribute set to ``a`` (0/1)."""
        if self.attr_column is None:
            raise ConfigError(
                f"the attribute game needs tabular data with a sensitive attribute (adult); "
                f"{self.name} has none"
            )
        out = x.clone()
        out[:, self.attr_column] = a.to(out.dtype)
        return out


def _split_pools(n: int, pool_size: int, aux_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = numpy_rng(seed, "split", 11).permutation(n)
    pool_size, aux_size = min(pool_size, n // 2), min(aux_size, n - min(pool_size, n // 2))
    return perm[:pool_size], perm[pool_size : pool_size + aux_size]


def load_game_data(
    name: str,
    *,
    root: str | Path | None = None,
    sensitive: str = "sex",
    property_class: int = 0,
    pool_size: int = 4000,
    aux_size: int = 4000,
    pretrain_size: int = 4000,
    aux_attribute_rate: float = 0.0,
    seed: int = 0,
    image_size: int = 24,
) -> GameData:
    """Load the pools of a game (see the module docstring; ``utkface``: :mod:`.utkface`,
    whose ``image_size`` is the side of the resized faces)."""
    if name not in GAME_DATASETS:
        raise ConfigError(
            f"data.name: {name!r} is not allowed; allowed: {', '.join(GAME_DATASETS)}"
        )
    if name == "utkface":
        return GameData(
            **load_utkface_game(
                root,
                sensitive=sensitive,
                pool_size=pool_size,
                aux_size=aux_size,
                pretrain_size=pretrain_size,
                aux_attribute_rate=aux_attribute_rate,
                seed=seed,
                image_size=image_size,
                shift=_shift,
            )
        )
    attr_column: int | None = None
    if name == "adult":
        if root is None:
            raise DataError(
                "adult: set data.root to the folder holding adult.data.gz and adult.test.gz"
            )
        xtr_np, ytr_np, atr_np, xte_np, yte_np, _, attr_column = load_adult(root, sensitive)
        xtr, ytr, atr = torch.from_numpy(xtr_np), torch.from_numpy(ytr_np), torch.from_numpy(atr_np)
        xte, yte = torch.from_numpy(xte_np), torch.from_numpy(yte_np)
        input_shape, num_classes, attribute = (1, 1, int(xtr.shape[1])), 2, sensitive
    else:
        data = load_dataset(name, root=root, seed=seed)
        n = len(data)
        xtr, ytr = (
            data.normalize(data.images("train", slice(None))),
            data.labels("train", slice(None)),
        )
        xte = data.normalize(data.images("test", slice(None)))
        yte = data.labels("test", slice(None))
        if not 0 <= property_class < data.num_classes:
            raise ConfigError(
                f"data.property_class: {property_class} is not a class of {name} "
                f"(0..{data.num_classes - 1})"
            )
        atr = (ytr == property_class).long()
        input_shape, num_classes, attribute = (
            data.input_shape,
            data.num_classes,
            f"class_{property_class}",
        )
        logger.info("%s: %d training images for the pools", name, n)
    pool, aux = _split_pools(len(ytr), pool_size, aux_size, seed)
    if aux_attribute_rate > 0:
        aux = _shift(aux, atr.numpy(), aux_attribute_rate, seed)
    keep = numpy_rng(seed, "split", 12).permutation(len(yte))[:pretrain_size]
    return GameData(
        name,
        xtr[pool],
        ytr[pool],
        atr[pool],
        xtr[aux],
        ytr[aux],
        atr[aux],
        xte[keep],
        yte[keep],
        input_shape,
        num_classes,
        attr_column,
        attribute,
    )


def _shift(aux: np.ndarray, a: np.ndarray, rate: float, seed: int) -> np.ndarray:
    if not 0 < rate < 1:
        raise ConfigError(f"game.aux_attribute_rate: {rate!r} must lie in (0, 1) (0 = no shift)")
    pos, neg = aux[a[aux] == 1], aux[a[aux] == 0]
    n = int(min(len(pos) / rate, len(neg) / (1 - rate)))
    rng = numpy_rng(seed, "split", 13)
    out = np.concatenate(
        [
            rng.choice(pos, round(n * rate), replace=False),
            rng.choice(neg, n - round(n * rate), replace=False),
        ]
    )
    return rng.permutation(out)
