"""uint8 conversion and the three writers (PNGs, grid, npz)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqcad_deploy.engines.errors import OutputError
from pqcad_deploy.engines.images import NPZ_KEY, nchw_to_nhwc, save_grid, save_npz, save_pngs, to_uint8


def _images(n: int = 5, h: int = 4, w: int = 6, c: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_to_uint8_matches_diffusers_formula() -> None:
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.001, 0.5, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 64, 128, 128, 191, 255, 255])
    # against diffusers' VaeImageProcessor path: (x/2+0.5).clamp(0,1) -> *255 -> round
    y = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(y), np.round(np.clip(y / 2 + 0.5, 0, 1) * 255).astype(np.uint8))


def test_nchw_to_nhwc() -> None:
    x = np.arange(24).reshape(1, 2, 3, 4)
    y = nchw_to_nhwc(x)
    assert y.shape == (1, 3, 4, 2) and y.flags.c_contiguous
    assert y[0, 2, 1, 1] == x[0, 1, 2, 1]


def test_save_pngs(tmp_path: Path) -> None:
    imgs = _images()
    paths = save_pngs(imgs, tmp_path / "out" / "pngs", start_index=10)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(10, 15)]
    assert sorted(p.name for p in (tmp_path / "out" / "pngs").iterdir()) == [p.name for p in paths]  # no temp files left
    for img, p in zip(imgs, paths):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), img)


def test_save_pngs_grayscale(tmp_path: Path) -> None:
    imgs = _images(c=1)
    (p,) = save_pngs(imgs[:1], tmp_path)
    back = Image.open(p)
    assert back.mode == "L"
    np.testing.assert_array_equal(np.asarray(back), imgs[0, ..., 0])


@pytest.mark.parametrize(("n", "ncols", "size"), [(5, 2, (12, 12)), (5, 8, (30, 4)), (16, 4, (24, 16)), (1, 3, (6, 4))])
def test_save_grid_size(tmp_path: Path, n: int, ncols: int, size: tuple[int, int]) -> None:
    imgs = _images(n)
    path = save_grid(imgs, tmp_path / "grid.png", ncols=ncols)
    grid = Image.open(path)
    assert grid.size == size  # (width, height)
    arr = np.asarray(grid)
    np.testing.assert_array_equal(arr[:4, :6], imgs[0])
    if n == 5 and ncols == 2:
        np.testing.assert_array_equal(arr[8:12, 0:6], imgs[4])  # row 2, col 0
        assert arr[8:12, 6:12].max() == 0  # the empty cell is black


def test_save_grid_bad_ncols(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="ncols must be a positive integer, got 0"):
        save_grid(_images(), tmp_path / "g.png", ncols=0)


def test_save_npz(tmp_path: Path) -> None:
    imgs = _images(7)
    path = save_npz(imgs, tmp_path / "samples.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
    with np.load(path) as data:
        assert list(data.keys()) == [NPZ_KEY] == ["images"]
        assert data["images"].dtype == np.uint8
        np.testing.assert_array_equal(data["images"], imgs)


def test_bad_images_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=re.escape("Images must be a uint8 array [N, H, W, C] with C in 1, 3, 4, got float32 [2, 3, 4, 4]")):
        save_pngs(np.zeros((2, 3, 4, 4), np.float32), tmp_path)


def test_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = blocker / "sub"
    with pytest.raises(OutputError, match=re.escape(f"Cannot create the image output directory {target}")):
        save_pngs(_images(), target)
    with pytest.raises(OutputError, match=re.escape(f"Cannot create the output directory {target}") + ".*choose a writable location"):
        save_grid(_images(), target / "grid.png")
    with pytest.raises(OutputError, match=re.escape(f"Cannot create the output directory {target}")):
        save_npz(_images(), target / "x.npz")


def test_save_npz_from_pngs_streams_a_loadable_npz(tmp_path: Path) -> None:
    from pqcad_deploy.engines.images import is_images_npz, save_npz_from_pngs

    imgs = _images(5, c=1)
    paths = save_pngs(imgs, tmp_path / "pngs")
    path = save_npz_from_pngs(paths, tmp_path / "s.npz", imgs.shape[1:])
    with np.load(path) as data:
        assert data.files == [NPZ_KEY]
        np.testing.assert_array_equal(data[NPZ_KEY], imgs)
    assert is_images_npz(path)
    np.savez(tmp_path / "other.npz", images=imgs, extra=imgs)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert not is_images_npz(tmp_path / "other.npz") and not is_images_npz(tmp_path / "junk.npz")
    with pytest.raises(OutputError, match="expected"):
        save_npz_from_pngs(paths, tmp_path / "bad.npz", (9, 9, imgs.shape[-1]))
    assert not (tmp_path / "bad.npz").exists()
