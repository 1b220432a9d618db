"""Image datasets: every loader returns one :class:`ImageData` (train/test tensors and stats).

Datasets of :func:`load_dataset`:

- ``digits`` (default, offline): scikit-learn's bundled 8x8 handwritten digits (1797 images,
  10 classes, values 0..16 scaled to [0, 1]), split into train/test with ``seed``.
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's datasets in its layout under
  ``root`` (default ``./data``): ``<root>/MNIST/raw``, ``<root>/FashionMNIST/raw``,
  ``<root>/cifar-10-batches-py``; ``download=True`` fetches them (needs internet).
- ``folder``: your own images as ``<root>/<class_name>/*.png|jpg|jpeg|bmp`` (one subfolder a
  class; sorted names give labels 0..K-1), always converted to RGB and resized to
  ``image_size`` x ``image_size`` (default 32), with a stratified test split.
- ``cifar10_npz``: ``<root>/cifar10_exact_subset.npz`` (or ``root`` naming the .npz) with
  ``x_train``/``x_test`` (N, 32, 32, 3) uint8, ``y_train``/``y_test`` and ``label_names``,
  e.g. the bit-exact CIFAR-10 subset in ``../shared/data/cifar10``.
- ``mnist_idx``: raw IDX files, gzipped or not, in ``root``: ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, plus ``train-*`` when present (official MNIST files, e.g. the
  test set in ``../shared/data/mnist``); one pair alone is split by ``test_fraction``.
- ``adult``: UCI Adult, tabular (``adult.data.gz``/``adult.test.gz`` in ``root``, e.g.
  ``../shared/data/adult``), encoded by :mod:`fl_privsim.core.tabular` as float32 inputs of shape
  (1, 1, D) (``mlp``/``linear`` flatten them), already standardised: mean 0, std 1 here.

Images are stored as uint8 (N, C, H, W), digits as float32 in [0, 1]; ``ImageData.images``
always returns float32 in [0, 1]. Splits and ``max_examples`` subsets derive from ``seed``
(purpose ``"split"``). Loaded datasets are cached in-process and shared: treat their tensors
as read-only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fl_privsim.core import plugins
from fl_privsim.core.data_files import NPZ_NAME, Raw, load_idx, load_npz, split
from fl_privsim.core.errors import ConfigError, DataError, did_you_mean
from fl_privsim.core.partition import SCHEMES, effective_batch_size, partition, sample_batch
from fl_privsim.core.paths import missing_path_message
from fl_privsim.core.seeding import numpy_rng
from fl_privsim.core.tabular import load_adult_raw

__all__ = [
    "DATASETS",
    "SCHEMES",
    "ImageData",
    "effective_batch_size",
    "load_dataset",
    "partition",
    "sample_batch",
]

logger = logging.getLogger(__name__)

#: The datasets (``data.name``): the registry :data:`fl_privsim.core.plugins.DATASETS`, which
#: each loader at the end of this module joins (``@plugins.DATASETS.register(name)``).
DATASETS = plugins.DATASETS
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
_FOLDER_LAYOUT = "<root>/<class_name>/*.png|jpg|jpeg|bmp"
# name -> (torchvision class, folder under root holding its files, the files expected there)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte, t10k-images-idx3-ubyte, ..."),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", "train-images-idx3-ubyte, ..."),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
}
# name -> (what a data.root folder must hold (a tuple: any one of), what to set it to), for the
# error on a data.root that does not exist (fl_privsim.core.paths.missing_path_message)
_ROOT_HOLDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "folder": ((), f"set data.root to your images as {_FOLDER_LAYOUT}"),
    "cifar10_npz": ((NPZ_NAME,), f"set data.root to {NPZ_NAME} or the folder holding it"),
    "mnist_idx": (
        (("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"),),
        (
            "set data.root to the folder holding t10k-images-idx3-ubyte(.gz) and "
            "t10k-labels-idx1-ubyte(.gz)"
        ),
    ),
    "adult": (
        ("adult.data.gz", "adult.test.gz"),
        "set data.root to the folder holding adult.data.gz and adult.test.gz (UCI Adult)",
    ),
}


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image dataset split into train and test.

    ``*_x`` are (N, C, H, W) uint8 in 0..255 or float32 in [0, 1]; ``*_y`` are (N,) int64.
    ``mean``/``std`` are per-channel statistics of the train images in [0, 1].
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.train_y.shape[0])

    def _select(self, split: str, idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "test"):
            raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        n = int(y.shape[0])
        if isinstance(idx, slice):
            index = torch.arange(n)[idx]
        elif isinstance(idx, torch.Tensor):
            index = idx.detach().to("cpu", torch.int64).reshape(-1)
        else:
            index = torch.as_tensor(np.asarray(idx, dtype=np.int64)).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            lo, hi = int(index.min()), int(index.max())
            raise DataError(f"{self.name}: {split} indices must lie in 0..{n - 1}, got {lo}..{hi}")
        return x, index

    def images(self, split: str, idx: Any) -> torch.Tensor:
        """Images ``idx`` of ``split`` ("train" or "test") as float32 (n, C, H, W) in [0, 1]."""
        x, index = self._select(split, idx)
        out = x[index]
        return out.float().div_(255.0) if out.dtype == torch.uint8 else out.to(torch.float32)

    def labels(self, split: str, idx: Any) -> torch.Tensor:
        """Labels ``idx`` of ``split`` as an int64 (n,) tensor."""
        _, index = self._select(split, idx)
        return (self.train_y if split == "train" else self.test_y)[index]

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """``(x01 - mean) / std`` per channel for (C, H, W) or (n, C, H, W) on any device."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean`` (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`; see the module docstring).

    Parameters
    ----------
    name
        Dataset name.
    root
        Where its files are (folder, npz file or folder, IDX folder, torchvision root);
        unused by ``digits``. torchvision datasets default to ``./data``.
    image_size
        Square side to resize to (bilinear, antialiased); ``None`` keeps the native size
        (``folder``: 32).
    download
        Let torchvision download ``mnist``/``fashion_mnist``/``cifar10`` (needs internet).
    test_fraction
        Held-out share (0 < f < 1) for datasets without their own test split (``digits``,
        ``folder``, ``mnist_idx`` with one pair of files); stratified by class.
    seed
        Seed of the train/test split and of the ``max_examples`` subset.
    max_examples
        Keep at most this many train examples (a seeded subset, original order).

    Returns
    -------
    ImageData
        Cached per argument set: calling again returns the same object.

    Raises
    ------
    ConfigError
        Unknown name or invalid argument.
    DataError
        Files missing, unreadable or of the wrong shape (the message says what to provide).
    """
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; "
            f"choose one of: {', '.join(DATASETS)}"
        )
    for key, value in (("image_size", image_size), ("max_examples", max_examples)):
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if value is not None and (not is_int or value < 1):
            raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if root is None and name in _TORCHVISION:
        root = "data"
    root_str = None if root is None else str(Path(root).expanduser().resolve())
    return _load_cached(
        name,
        root_str,
        None if image_size is None else int(image_size),
        bool(download),
        float(test_fraction),
        int(seed),
        None if max_examples is None else int(max_examples),
    )


@functools.lru_cache(maxsize=16)
def _load_cached(
    name: str,
    root: str | None,
    image_size: int | None,
    download: bool,
    test_fraction: float,
    seed: int,
    max_examples: int | None,
) -> ImageData:
    path = None if root is None else Path(root)
    if path is not None and name in _ROOT_HOLDS and not path.exists():
        contains, expect = _ROOT_HOLDS[name]
        what = "folder dataset: data.root" if name == "folder" else f"{name}: data.root"
        raise DataError(missing_path_message(what, path, contains=contains, expect=expect))
    raw = DATASETS.get(name)(
        path,
        image_size=image_size,
        download=download,
        test_fraction=test_fraction,
        seed=seed,
    )
    train_x, train_y, test_x, test_y, class_names = raw
    if max_examples is not None and max_examples < len(train_y):
        rng = numpy_rng(seed, "split", 1)
        keep = np.sort(rng.choice(len(train_y), max_examples, replace=False))
        train_x, train_y = train_x[keep], train_y[keep]
    train_x, test_x = _resize(train_x, image_size), _resize(test_x, image_size)
    if len(train_y) == 0:
        raise DataError(f"{name}: no training examples (root {root})")
    # tabular inputs are standardised by their reader: no second normalisation
    mean, std = ((0.0,), (1.0,)) if name == "adult" else _channel_stats(train_x)
    num_classes = max(len(class_names), int(train_y.max()) + 1)
    logger.info(
        "loaded %s: %d train, %d test, shape %s",
        name,
        len(train_y),
        len(test_y),
        tuple(train_x.shape[1:]),
    )
    return ImageData(
        name, train_x, train_y, test_x, test_y, num_classes, mean, std, tuple(class_names)
    )


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-2:] == (size, size):
        return x
    chunks = []
    for chunk in x.split(1024):
        f = chunk.float() / 255.0 if x.dtype == torch.uint8 else chunk.float()
        f = F.interpolate(
            f, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
        chunks.append(f.mul_(255.0).round_().to(torch.uint8) if x.dtype == torch.uint8 else f)
    if not chunks:
        return x.new_empty((0, x.shape[1], size, size))
    return torch.cat(chunks)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in x.split(1024):
        f = chunk.to(torch.float64) / scale
        total += f.sum(dim=(0, 2, 3))
        squares += f.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797, 8, 8) float64 images (0..16) and int labels.

    Read straight from the file ``sklearn.datasets.load_digits`` reads (``digits.csv.gz``:
    64 pixel columns, then the label), found without importing scikit-learn, which would cost
    every client process ~150 MB (scipy, pandas); ``load_digits`` itself where the file is
    not there."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    path = origin.parent / "datasets" / "data" / "digits.csv.gz" if origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _load_digits(test_fraction: float, seed: int) -> Raw:
    images, target = _digits_arrays()
    x = torch.from_numpy((images / 16.0).astype(np.float32)).unsqueeze(1)
    names = tuple(str(n) for n in range(10))
    return (*split(x, target, test_fraction, seed), names)


def _load_torchvision(name: str, root: Path, download: bool) -> Raw:
    import torchvision.datasets

    cls_name, sub, files = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = (cls(str(root), train=t, download=download) for t in (True, False))
    except (RuntimeError, OSError, ValueError) as err:
        fix = f"put the torchvision layout under {root / sub} ({files})"
        raise DataError(
            f"could not download {name} into {root} ({err}); check the connection or {fix}"
            if download
            else f"{name} files not found under {root / sub}; {fix} or set "
            "data.download = true to fetch it (needs internet)"
        ) from err

    def tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(ds.data, dtype=np.uint8))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))

    return (*tensors(train), *tensors(test), tuple(str(c) for c in train.classes))


def _load_folder(root: Path | None, size: int, test_fraction: float, seed: int) -> Raw:
    from PIL import Image

    if root is None or not root.is_dir():
        where = (
            "data.root is not set"
            if root is None
            else (f"{root} is not a folder" if root.exists() else f"{root} does not exist")
        )
        raise DataError(f"folder dataset: {where}; expected images as {_FOLDER_LAYOUT}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = (
            f"only one class subfolder ({classes[0].name})" if classes else ("no class subfolders")
        )
        raise DataError(
            f"folder dataset: {root} has {found}; expected at least 2 classes as {_FOLDER_LAYOUT}"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, class_dir in enumerate(classes):
        before = len(images)
        for file in sorted(class_dir.rglob("*")):
            if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(file) as im:
                    rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(rgb, dtype=np.uint8))
                    labels.append(label)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                logger.warning("folder dataset: skipping unreadable image %s (%s)", file, err)
        if len(images) == before:
            empty.append(class_dir.name)
    if not images:
        raise DataError(
            f"folder dataset: no readable images under {root}; expected {_FOLDER_LAYOUT}"
        )
    if empty:
        raise DataError(
            f"folder dataset: class folder(s) {', '.join(empty)} in {root} hold no "
            f"readable images; expected {_FOLDER_LAYOUT}"
        )
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return (*split(x, np.asarray(labels), test_fraction, seed), tuple(c.name for c in classes))


# ----------------------------------------------------------------------------- the built-ins
# One loader per dataset, ``(root, *, image_size, download, test_fraction, seed) -> Raw``
# (train_x, train_y, test_x, test_y, class_names), registered under its ``data.name``. What a
# loader declares (read by the config's checks): ``needs_root`` (default true: the config asks
# for data.root) and ``downloads`` (default false: data.download = true may stand in for it).

_L = TypeVar("_L")


def _declare(**flags: bool) -> Callable[[_L], _L]:
    def deco(loader: _L) -> _L:
        for key, value in flags.items():
            setattr(loader, key, value)
        return loader

    return deco


@plugins.DATASETS.register("digits")
@_declare(needs_root=False)
def _digits(root: Path | None, *, test_fraction: float, seed: int, **_: Any) -> Raw:
    return _load_digits(test_fraction, seed)


@plugins.DATASETS.register("mnist")
@_declare(downloads=True)
def _mnist(root: Path, *, download: bool, **_: Any) -> Raw:
    return _load_torchvision("mnist", root, download)


@plugins.DATASETS.register("fashion_mnist")
@_declare(downloads=True)
def _fashion_mnist(root: Path, *, download: bool, **_: Any) -> Raw:
    return _load_torchvision("fashion_mnist", root, download)


@plugins.DATASETS.register("cifar10")
@_declare(downloads=True)
def _cifar10(root: Path, *, download: bool, **_: Any) -> Raw:
    return _load_torchvision("cifar10", root, download)


@plugins.DATASETS.register("folder")
def _folder(
    root: Path | None, *, image_size: int | None, test_fraction: float, seed: int, **_: Any
) -> Raw:
    return _load_folder(root, image_size or 32, test_fraction, seed)


@plugins.DATASETS.register("cifar10_npz")
def _cifar10_npz(root: Path | None, **_: Any) -> Raw:
    return load_npz(root)


@plugins.DATASETS.register("mnist_idx")
def _mnist_idx(root: Path | None, *, test_fraction: float, seed: int, **_: Any) -> Raw:
    return load_idx(root, test_fraction, seed)


@plugins.DATASETS.register("adult")
def _adult(root: Path | None, **_: Any) -> Raw:
    return load_adult_raw(root)
