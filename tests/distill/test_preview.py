"""The per-class preview grid of a synthetic set: every image lands in its class's row, in order."""

import io

import matplotlib.image as mpimg
import numpy as np

from medfdd.artifacts import preview_mosaic, preview_png


def cell(mosaic: np.ndarray, k: int, j: int, h: int, w: int, gap: int) -> np.ndarray:
    return mosaic[k * (h + gap):k * (h + gap) + h, j * (w + gap):j * (w + gap) + w]


def test_each_class_row_holds_its_images_in_order_and_empty_cells_stay_white():
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 1.5, size=(7, 1, 5, 4)).astype(np.float32)  # out of [0, 1] on purpose
    labels = np.array([2, 0, 2, 2, 0, 1, 2])
    mosaic = preview_mosaic(images, labels, 4, max_cols=3, gap=2)
    assert mosaic.shape == (4 * 7 - 2, 3 * 6 - 2, 3)
    rows = {0: [1, 4], 1: [5], 2: [0, 2, 3], 3: []}  # class 2's fourth image (index 6) is past max_cols
    for k, idx in rows.items():
        for j in range(3):
            got = cell(mosaic, k, j, 5, 4, 2)
            if j < len(idx):
                want = np.clip(images[idx[j], 0], 0, 1)
                assert all(np.array_equal(got[..., c], want) for c in range(3))
            else:
                assert (got == 1).all()
    gaps = mosaic[5:7]  # between the rows of class 0 and class 1
    assert (gaps == 1).all()


def test_volumes_show_their_middle_slice_and_colour_images_keep_their_channels():
    vol = np.zeros((1, 1, 5, 3, 3), dtype=np.float32)
    vol[0, 0, 2] = 0.25
    mosaic = preview_mosaic(vol, np.array([0]), 1, gap=0)
    assert np.array_equal(mosaic, np.full((3, 3, 3), 0.25, dtype=np.float32))
    rgb = np.stack([np.full((2, 2), v, dtype=np.float32) for v in (0.1, 0.5, 0.9)])[None]
    assert np.allclose(preview_mosaic(rgb, np.array([0]), 1, gap=0)[0, 0], [0.1, 0.5, 0.9])


def test_preview_png_is_a_real_image_with_the_grid_drawn():
    rng = np.random.default_rng(1)
    images = rng.random((20, 1, 8, 8)).astype(np.float32)
    png = preview_png(images, np.repeat(np.arange(4), 5), ["a", "b", "c", "d"], "site-0")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.1  # the random images are drawn, not a blank canvas
