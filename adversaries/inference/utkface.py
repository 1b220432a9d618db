"""UTKFace for the inference games (Zhang, Song & Qi, "Age Progression/Regression by
Conditional Adversarial Autoencoder", CVPR 2017; the dataset Li et al., arXiv:2408.16913, use).

Read from ``root`` (default ``../shared/data/utkface``): ``utkface_subset_1500.zip`` (1500
aligned 200×200 RGB face crops, 150 per gender × race cell) and
``utkface_subset_1500_labels.csv`` (``filename,age,gender,race,sha256``). UTKFace is for
non-commercial research only: it is **never** shipped with the package or committed; the
loader only reads the shared folder.

- inputs: the faces resized (area interpolation) to ``image_size`` × ``image_size`` RGB
  (default 24, so per-sample gradients stay cheap on a CPU), normalised per channel with the
  pretraining split's statistics;
- label (the task of the global model): ``age >= 30`` (2 classes; 46% of the subset);
- sensitive attribute ``a``: ``gender`` (1 = female, the dataset's coding) or ``race``
  (binarised as for Adult: 1 = not White, i.e. UTKFace race ≠ 0; 80% of this subset).

Splits (seeded): 20% of the records pretrain the global model; the rest is cut into the
challenger's pool and the adversary's disjoint auxiliary pool (at most half each).
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.seeding import numpy_rng

logger = logging.getLogger(__name__)

__all__ = ["UTKFACE_FILES", "UTKFACE_SENSITIVE", "load_utkface", "load_utkface_game"]

UTKFACE_FILES = ("utkface_subset_1500.zip", "utkface_subset_1500_labels.csv")
UTKFACE_SENSITIVE: tuple[str, ...] = ("gender", "race")
AGE_THRESHOLD = 30


def _default_root() -> Path:
    repo = Path(__file__).resolve().parents[2]
    for cand in (Path("../shared/data/utkface"), repo.parent / "shared" / "data" / "utkface"):
        if cand.is_dir():
            return cand
    return Path("../shared/data/utkface")


@lru_cache(maxsize=4)
def _read(root: str, image_size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    folder = Path(root)
    zpath, cpath = folder / UTKFACE_FILES[0], folder / UTKFACE_FILES[1]
    if not zpath.is_file() or not cpath.is_file():
        raise DataError(
            f"utkface: {folder} must hold {UTKFACE_FILES[0]} and {UTKFACE_FILES[1]} "
            "(set data.root; UTKFace is never shipped with the package)"
        )
    with open(cpath, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"filename", "age", "gender", "race"} <= set(rows[0]):
        raise DataError(f"utkface: {cpath} needs the columns filename, age, gender, race")
    images = []
    with zipfile.ZipFile(zpath) as zf:
        names = set(zf.namelist())
        for r in rows:
            if r["filename"] not in names:
                raise DataError(
                    f"utkface: {r['filename']} is listed in {cpath.name} but not in {zpath.name}"
                )
            with Image.open(io.BytesIO(zf.read(r["filename"]))) as im:
                im.draft(
                    "RGB", (2 * image_size, 2 * image_size)
                )  # JPEG DCT downscaling: fast decode
                arr = np.asarray(
                    im.convert("RGB").resize(
                        (2 * image_size, 2 * image_size), Image.Resampling.BILINEAR
                    ),
                    dtype=np.uint8,
                )
            images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    x = torch.stack(images).float() / 255.0
    x = F.interpolate(x, size=(image_size, image_size), mode="area")
    age = np.array([int(r["age"]) for r in rows])
    gender = np.array([int(r["gender"]) for r in rows])
    race = np.array([int(r["race"]) for r in rows])
    logger.info("utkface: %d faces from %s at %dx%d", len(rows), zpath, image_size, image_size)
    return x, age, gender, race


def load_utkface(
    root: str | Path | None = None, sensitive: str = "gender", image_size: int = 24
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All records as ``(x [n, 3, s, s] in [0, 1], y = age >= 30, a)`` (see the module docstring)."""
    if sensitive not in UTKFACE_SENSITIVE:
        raise ConfigError(
            f"data.sensitive: {sensitive!r} is not allowed for utkface; allowed: "
            f"{', '.join(UTKFACE_SENSITIVE)}"
        )
    if not 8 <= image_size <= 200:
        raise ConfigError(f"data.image_size: {image_size} must lie in 8..200 for utkface")
    folder = Path(root).expanduser() if root else _default_root()
    if not folder.is_dir():
        raise DataError(
            f"utkface: folder {folder} does not exist; set data.root to the folder holding "
            f"{UTKFACE_FILES[0]} and {UTKFACE_FILES[1]} (UTKFace is never shipped)"
        )
    x, age, gender, race = _read(str(folder.resolve()), int(image_size))
    a = gender if sensitive == "gender" else (race != 0).astype(np.int64)
    return (
        x.clone(),
        torch.from_numpy((age >= AGE_THRESHOLD).astype(np.int64)),
        torch.from_numpy(a.astype(np.int64)),
    )


def load_utkface_game(
    root: str | Path | None,
    *,
    sensitive: str,
    pool_size: int,
    aux_size: int,
    pretrain_size: int,
    aux_attribute_rate: float,
    seed: int,
    image_size: int = 24,
    shift: Callable[..., np.ndarray] | None = None,
) -> dict[str, Any]:
    """The pools of a UTKFace game as keyword arguments of ``GameData`` (name included).

    ``shift`` is ``datasets._shift`` (auxiliary distribution shift), passed in to avoid an
    import cycle."""
    x, y, a = load_utkface(root, sensitive, image_size)
    n = int(y.shape[0])
    perm = numpy_rng(seed, "split", 14).permutation(n)
    n_pre = min(pretrain_size, n // 5)
    pre, rest = perm[:n_pre], perm[n_pre:]
    n_pool = min(pool_size, len(rest) // 2)
    pool, aux = rest[:n_pool], rest[n_pool : n_pool + min(aux_size, len(rest) - n_pool)]
    if aux_attribute_rate > 0 and shift is not None:
        aux = shift(aux, a.numpy(), aux_attribute_rate, seed)
    mean = x[pre].mean(dim=(0, 2, 3), keepdim=True)
    std = x[pre].std(dim=(0, 2, 3), keepdim=True) + 1e-6
    x = (x - mean) / std
    return {
        "name": "utkface",
        "x_pool": x[pool],
        "y_pool": y[pool],
        "a_pool": a[pool],
        "x_aux": x[aux],
        "y_aux": y[aux],
        "a_aux": a[aux],
        "x_pre": x[pre],
        "y_pre": y[pre],
        "input_shape": (3, image_size, image_size),
        "num_classes": 2,
        "attr_column": None,
        "attribute": sensitive,
    }
