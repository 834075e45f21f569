"""Image loading: PNG folders, .npz arrays, the Fashion-MNIST idx files, and their errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from pqcad_deploy.eval.errors import DatasetNotFoundError, FidError, ImageInputError
from pqcad_deploy.eval.images_io import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_INSTALL_HINT,
    load_fashion_mnist,
    load_images,
    read_idx_images,
)


def _write_idx(path, images: np.ndarray) -> None:
    header = np.array([0x00000803, *images.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + images.astype(np.uint8).tobytes())


def test_png_folder_sorted_grayscale(tmp_path):
    for value, name in [(10, "b.png"), (20, "a.png"), (30, "c.png")]:
        Image.fromarray(np.full((5, 7), value, np.uint8), mode="L").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_images(tmp_path)
    assert images.shape == (3, 5, 7, 1) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [20, 10, 30]  # a, b, c


def test_png_folder_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "x.png")
    np.testing.assert_array_equal(load_images(tmp_path)[0], rgb)


def test_npz_round_trip(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=images)
    np.testing.assert_array_equal(load_images(tmp_path / "s.npz"), images)


def test_empty_folder(tmp_path):
    with pytest.raises(ImageInputError, match="no .png files"):
        load_images(tmp_path)


def test_png_mode_and_size_mismatch(tmp_path):
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(tmp_path / "a.png")
    with pytest.raises(ImageInputError, match="RGBA"):
        load_images(tmp_path)
    (tmp_path / "a.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8), mode="L").save(tmp_path / "b.png")
    with pytest.raises(ImageInputError, match="share size"):
        load_images(tmp_path)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 8, 8, 1), np.float32), "uint8"),
        (np.zeros((2, 1, 8, 8), np.uint8), "channel-first"),
        (np.zeros((2, 8, 8), np.uint8), "add a channel axis"),
        (np.zeros((2, 8, 8, 2), np.uint8), "N x H x W x C"),
        (np.zeros((0, 8, 8, 1), np.uint8), "no pixels"),
    ],
)
def test_npz_wrong_dtype_or_shape(tmp_path, array, match):
    np.savez(tmp_path / "s.npz", images=array)
    with pytest.raises(ImageInputError, match=match):
        load_images(tmp_path / "s.npz")


def test_npz_missing_key_and_other_paths(tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((1, 4, 4, 1), np.uint8))
    with pytest.raises(ImageInputError, match="no key 'images'.*samples"):
        load_images(tmp_path / "s.npz")
    with pytest.raises(ImageInputError, match="does not exist"):
        load_images(tmp_path / "missing.npz")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(ImageInputError, match="folder of .png files or an .npz"):
        load_images(tmp_path / "x.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ImageInputError, match="not a readable"):
        load_images(tmp_path / "junk.npz")


def test_fashion_mnist_padding_from_synthetic_idx(tmp_path):
    raw = np.random.default_rng(2).integers(1, 256, size=(3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / FASHION_MNIST_FILES["test"], raw)
    images = load_fashion_mnist("test", data_dir=tmp_path)
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], raw)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (images[:, border, 0] == 0).all()


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert FASHION_MNIST_INSTALL_HINT in str(info.value) and "dataset-fashion-mnist" in str(info.value)
    with pytest.raises(FidError, match="train, test"):
        load_fashion_mnist("val", data_dir=tmp_path)
    with gzip.open(tmp_path / "bad.gz", "wb") as fh:
        fh.write(np.array([0x801, 3], ">u4").tobytes())
    with pytest.raises(DatasetNotFoundError, match="header"):
        read_idx_images(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(np.array([0x803, 2, 28, 28], ">u4").tobytes() + b"\0" * 10)
    with pytest.raises(DatasetNotFoundError, match="pixels"):
        read_idx_images(tmp_path / "short.gz")


def test_real_fashion_mnist(fmnist_test_images):
    assert fmnist_test_images.shape == (10_000, 32, 32, 1)
    assert fmnist_test_images[:, :2].max() == 0 and fmnist_test_images.max() == 255


def _sample_folder(folder, n, *, published=True):
    """A folder as `pqcad-deploy sample` leaves it: NNNNN.png, samples.json, grid.png and (published) the marker."""
    import json

    folder.mkdir()
    images = np.random.default_rng(2).integers(0, 256, size=(n + 1, 4, 4), dtype=np.uint8)
    for i in range(n + 1):  # one image more than samples.json lists: it must not be read
        Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(folder / "grid.png")
    (folder / "samples.json").write_text(json.dumps({"tool": "pqcad-deploy", "format": "pqcad-samples", "n": n}))
    if published:
        (folder / ".pqcad-deploy.json").write_text(json.dumps({"tool": "pqcad-deploy", "kind": "samples", "files": []}))
    return images[:n, ..., None]


def test_sample_folder_reads_exactly_its_listed_images(tmp_path):
    expected = _sample_folder(tmp_path / "imgs", 3)
    np.testing.assert_array_equal(load_images(tmp_path / "imgs"), expected)
    (tmp_path / "imgs" / "00001.png").unlink()
    with pytest.raises(ImageInputError, match="lacks 1 of the 3 images"):
        load_images(tmp_path / "imgs")


@pytest.mark.parametrize("name, published", [("imgs.partial", False), ("imgs.partial", True), ("imgs", False)])
def test_unfinished_sample_folder_is_refused(tmp_path, name, published):
    _sample_folder(tmp_path / name, 2, published=published)
    with pytest.raises(ImageInputError, match=r"unfinished `pqcad-deploy sample` output .*--resume"):
        load_images(tmp_path / name)


def test_plain_folder_skips_grid_png(tmp_path):
    Image.fromarray(np.full((4, 4), 7, np.uint8), mode="L").save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "grid.png")  # another size: not read
    images = load_images(tmp_path)
    assert images.shape == (1, 4, 4, 1) and (images == 7).all()
    (tmp_path / "a.png").unlink()
    with pytest.raises(ImageInputError, match="no .png files other than grid.png"):
        load_images(tmp_path)
