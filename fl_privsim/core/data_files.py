"""Readers of dataset files: the CIFAR-10 ``.npz`` subset and raw MNIST IDX files.

Both return ``(train_x, train_y, test_x, test_y, class_names)`` with images as uint8
(N, C, H, W) tensors; :mod:`fl_privsim.core.data` wraps them into an ``ImageData``.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fl_privsim.core.errors import DataError
from fl_privsim.core.partition import train_test_indices
from fl_privsim.core.paths import missing_path_message, shared_data_dir

NPZ_NAME = "cifar10_exact_subset.npz"
Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]


def split(
    x: torch.Tensor, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, seeded train/test split of ``(x, y)``."""
    tr, te = train_test_indices(y, test_fraction=test_fraction, seed=seed)
    yt = torch.from_numpy(y.astype(np.int64))
    return x[tr], yt[tr], x[te], yt[te]


def load_npz(root: Path | None) -> Raw:
    """Read ``cifar10_exact_subset.npz`` (``root`` is the file or its folder)."""
    if root is None:
        raise DataError(f"cifar10_npz: data.root must name {NPZ_NAME} or the folder holding it")
    path = root if root.suffix == ".npz" else root / NPZ_NAME
    if not path.is_file():
        raise DataError(
            missing_path_message(
                "cifar10_npz:",
                path,
                problem="not found",
                expect=f"set data.root to {NPZ_NAME} or its folder (e.g. {shared_data_dir() / 'cifar10'})",
            )
        )
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"cifar10_npz: {path} lacks arrays {missing}; has {npz.files}")
            arrays = {k: npz[k] for k in (*keys, "label_names") if k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cifar10_npz: cannot read {path} as .npz ({err})") from err
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].reshape(-1)
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8 or len(x) != len(y):
            raise DataError(
                f"cifar10_npz: {path}: x_{split} must be (N, H, W, 1|3) uint8 with "
                f"N = len(y_{split}); got {x.shape} {x.dtype}, {len(y)} labels"
            )
        out += [
            torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(y.astype(np.int64)),
        ]
    num = int(torch.cat([out[1], out[3]]).max()) + 1
    names = tuple(str(n) for n in arrays.get("label_names", range(num)))
    return out[0], out[1], out[2], out[3], names


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of uint8 (magic 0x00 0x00 0x08 ndim), gzipped or not."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"mnist_idx: cannot read {path} ({err})") from err
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(
            f"mnist_idx: {path} is not a {ndim}-d uint8 IDX file "
            f"(magic {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"mnist_idx: {path} is truncated (header of {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(
            f"mnist_idx: {path} is truncated or corrupt: {len(raw) - header} data "
            f"bytes for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(root: Path | None, test_fraction: float, seed: int) -> Raw:
    """Read MNIST IDX files from ``root``; a lone pair is split by ``test_fraction``."""
    if root is None or not root.is_dir():
        where = "data.root is not set" if root is None else f"{root.absolute()} is not a folder"
        raise DataError(
            f"mnist_idx: {where}; expected t10k-images-idx3-ubyte(.gz) and "
            "t10k-labels-idx1-ubyte(.gz), optionally train-*, in one folder"
        )
    pairs: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for prefix in ("train", "t10k"):
        found = [
            next(
                (
                    root / f"{prefix}-{kind}-ubyte{ext}"
                    for ext in ("", ".gz")
                    if (root / f"{prefix}-{kind}-ubyte{ext}").is_file()
                ),
                None,
            )
            for kind in ("images-idx3", "labels-idx1")
        ]
        if any(found) and not all(found):
            raise DataError(f"mnist_idx: {root} has {prefix} images or labels but not both")
        if all(found):
            assert found[0] is not None and found[1] is not None  # all(found)
            x, y = _read_idx(found[0], 3), _read_idx(found[1], 1)
            if len(x) != len(y):
                raise DataError(f"mnist_idx: {root}: {len(x)} {prefix} images, {len(y)} labels")
            pairs[prefix] = (torch.from_numpy(x.copy()).unsqueeze(1), y.astype(np.int64))
    if not pairs:
        raise DataError(
            f"mnist_idx: no IDX files in {root}; expected t10k-images-idx3-ubyte(.gz)"
            " and t10k-labels-idx1-ubyte(.gz), optionally train-*"
        )
    if len(pairs) == 2:
        (xtr, ytr_np), (xte, yte_np) = pairs["train"], pairs["t10k"]
        ytr, yte = torch.from_numpy(ytr_np), torch.from_numpy(yte_np)
    else:
        xtr, ytr, xte, yte = split(*next(iter(pairs.values())), test_fraction, seed)
    num = int(torch.cat([ytr, yte]).max()) + 1
    return xtr, ytr, xte, yte, tuple(str(i) for i in range(num))
