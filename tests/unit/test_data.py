"""Datasets: the bundled digits, user image folders, torchvision roots and the shared real files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_privsim.core import data as data_mod
from fl_privsim.core.data import DATASETS, ImageData, load_dataset
from fl_privsim.core.errors import ConfigError, DataError


# ---------------------------------------------------------------------------- digits
def test_digits_shapes_range_and_stats() -> None:
    data = load_dataset("digits")
    assert isinstance(data, ImageData)
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 10 and data.class_names == tuple(str(i) for i in range(10))
    assert len(data) + len(data.test_y) == 1797
    assert len(data.test_y) == pytest.approx(0.2 * 1797, abs=10)
    assert data.train_y.dtype == torch.int64 and data.test_y.dtype == torch.int64
    x = data.images("train", np.arange(len(data)))
    assert x.dtype == torch.float32 and x.shape == (len(data), 1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert data.mean[0] == pytest.approx(float(x.double().mean()), abs=1e-9)
    assert data.std[0] == pytest.approx(float(x.double().std(unbiased=False)), abs=1e-9)
    # stratified: every class is in the test split in about the same share
    counts = np.bincount(data.test_y.numpy(), minlength=10)
    assert counts.min() >= 30


def test_digits_split_determinism() -> None:
    a = load_dataset("digits", seed=1)
    assert load_dataset("digits", seed=1) is a  # cached in-process
    fresh = data_mod._load_cached.__wrapped__("digits", None, None, False, 0.2, 1, None)
    assert fresh is not a
    assert torch.equal(fresh.train_x, a.train_x) and torch.equal(fresh.test_y, a.test_y)
    c = load_dataset("digits", seed=2)
    assert not torch.equal(a.test_x, c.test_x)
    # either split is a partition of the same 1797 images
    rows = [torch.cat([d.train_x, d.test_x]).flatten(1) for d in (a, c)]
    assert torch.equal(torch.sort(rows[0], dim=0).values, torch.sort(rows[1], dim=0).values)


def test_digits_resize_and_max_examples() -> None:
    data = load_dataset("digits", image_size=16, max_examples=100, seed=3)
    assert data.input_shape == (1, 16, 16)
    assert data.test_x.shape[1:] == (1, 16, 16)
    assert len(data) == 100
    x = data.images("train", range(100))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = load_dataset("digits", image_size=16, max_examples=100, seed=4)
    assert not torch.equal(data.train_x, again.train_x)


def test_images_labels_normalize_roundtrip() -> None:
    data = load_dataset("digits")
    idx = [5, 0, 7]
    x = data.images("test", idx)
    assert x.shape == (3, 1, 8, 8)
    assert torch.equal(data.labels("test", idx), data.test_y[idx])
    z = data.normalize(x)
    assert torch.allclose(data.denormalize(z), x, atol=1e-6)
    full = data.normalize(data.images("train", np.arange(len(data))))
    assert float(full.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(full.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert data.normalize(x[0]).shape == (1, 8, 8)  # a single (C, H, W) image too
    with pytest.raises(ConfigError, match="split"):
        data.images("valid", idx)
    with pytest.raises(DataError, match="indices"):
        data.images("test", [len(data.test_y)])


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="digits.*mnist_idx"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ConfigError, match="max_examples"):
        load_dataset("digits", max_examples=0)
    assert set(DATASETS) == {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "folder",
        "cifar10_npz",
        "mnist_idx",
        "adult",
    }


# ---------------------------------------------------------------------------- folder
def _make_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = (10 + 3 * i, 12 + c)  # different sizes
            if i % 2:
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(root / name / f"{i}.png")
            else:  # grayscale, converted to RGB on load
                arr = np.full((size[1], size[0]), 40 * c + 10, dtype=np.uint8)
                Image.fromarray(arr, "L").save(root / name / f"{i}.png")


def test_folder_dataset(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"cat": 5, "dog": 5})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset("folder", root=tmp_path, seed=0)
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.input_shape == (3, 32, 32)
    assert data.train_x.dtype == torch.uint8
    assert len(data) == 8 and len(data.test_y) == 2
    assert sorted(data.test_y.tolist()) == [0, 1]  # stratified
    assert sorted(torch.cat([data.train_y, data.test_y]).tolist()) == [0] * 5 + [1] * 5
    small = load_dataset("folder", root=tmp_path, image_size=16, seed=0)
    assert small.input_shape == (3, 16, 16) and small.test_x.shape == (2, 3, 16, 16)
    # a constant grayscale image stays constant and equal in all three channels
    gray = data.train_x[data.train_y == 0][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_folder_skips_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    with caplog.at_level("WARNING", logger="fl_privsim.core.data"):
        data = load_dataset("folder", root=tmp_path)
    assert len(data) + len(data.test_y) == 6
    assert "broken.png" in caplog.text


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("folder", root=missing)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("folder", root=a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.*no class subfolders.*<class_name>"):
        load_dataset("folder", root=empty)
    single = tmp_path / "single"
    _make_folder(single, {"only": 3})
    with pytest.raises(DataError, match=f"{single}.*only one class"):
        load_dataset("folder", root=single)
    no_images = tmp_path / "noimg"
    (no_images / "a").mkdir(parents=True)
    (no_images / "b").mkdir()
    (no_images / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=f"no readable images under {no_images}"):
        load_dataset("folder", root=no_images)
    half = tmp_path / "half"
    _make_folder(half, {"a": 2})
    (half / "b").mkdir()
    with pytest.raises(DataError, match="class folder.*b.*no readable images"):
        load_dataset("folder", root=half)


# ---------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize(
    "name,sub",
    [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "cifar-10-batches-py")],
)
def test_torchvision_missing(tmp_path: Path, name: str, sub: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / sub) in msg and "download" in msg


# ---------------------------------------------------------------------------- shared real files
@pytest.mark.shared_data
def test_cifar10_npz_real(shared_data: Path) -> None:
    folder = shared_data / "cifar10"
    data = load_dataset("cifar10_npz", root=folder)
    assert data.input_shape == (3, 32, 32)
    assert tuple(data.train_x.shape) == (932, 3, 32, 32) and len(data.test_y) == 846
    assert data.num_classes == 10 and data.class_names[0] == "airplane"
    with np.load(folder / "cifar10_exact_subset.npz") as npz:
        assert np.array_equal(data.train_x.permute(0, 2, 3, 1).numpy(), npz["x_train"])
        assert np.array_equal(data.test_x.permute(0, 2, 3, 1).numpy(), npz["x_test"])
        assert np.array_equal(data.test_y.numpy(), npz["y_test"])
        assert torch.equal(
            data.images("train", [3])[0] * 255,
            torch.from_numpy(npz["x_train"][3]).permute(2, 0, 1).float(),
        )
    same = load_dataset("cifar10_npz", root=folder / "cifar10_exact_subset.npz")
    assert torch.equal(same.train_x, data.train_x)
    assert all(0.3 < m < 0.6 for m in data.mean) and all(0.15 < s < 0.35 for s in data.std)


def test_cifar10_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root"):
        load_dataset("cifar10_npz")
    with pytest.raises(DataError, match=str(tmp_path / "cifar10_exact_subset.npz")):
        load_dataset("cifar10_npz", root=tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("cifar10_npz", root=bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="y_train"):
        load_dataset("cifar10_npz", root=partial)


@pytest.mark.shared_data
def test_mnist_idx_real(shared_data: Path) -> None:
    folder = shared_data / "mnist"
    data = load_dataset("mnist_idx", root=folder, seed=0)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data) == 8000 and len(data.test_y) == 2000
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert (
        np.bincount(labels).tolist()
        == np.bincount(torch.cat([data.train_y, data.test_y]).numpy()).tolist()
    )
    assert data.mean[0] == pytest.approx(0.13, abs=0.01)  # the known MNIST mean
    # the split is a permutation of the files' images: check a few exactly
    first = data.train_x[0, 0].numpy()
    hits = np.flatnonzero((raw == first).all(axis=(1, 2)))
    assert len(hits) >= 1 and labels[hits[0]] == int(data.train_y[0])
    other = load_dataset("mnist_idx", root=folder, seed=1)
    assert not torch.equal(other.test_y, data.test_y)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def test_mnist_idx_synthetic_train_and_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 3
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(x))  # plain
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:  # gzipped
            f.write(_idx_bytes(y))
        if prefix == "t10k":
            test_x = x
    data = load_dataset("mnist_idx", root=tmp_path)
    assert len(data) == 30 and len(data.test_y) == 10 and data.num_classes == 3
    assert np.array_equal(data.test_x[:, 0].numpy(), test_x)


def test_mnist_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no IDX files"):
        load_dataset("mnist_idx", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x13\x37garbage")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="not a 3-d uint8 IDX file"):
        load_dataset("mnist_idx", root=tmp_path)
    truncated = _idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist_idx", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 broken gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("mnist_idx", root=tmp_path)
