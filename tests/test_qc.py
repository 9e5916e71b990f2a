"""Tile quality scores: glass reads as background, blur lowers focus."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from wsi_assist.qc import scores, tile_qc
from wsi_assist.stream import TileBatch


def test_scores_separate_glass_tissue_and_blur() -> None:
    rng = np.random.default_rng(0)
    glass = np.full((224, 224, 3), 245, np.uint8)
    tissue = rng.integers(60, 200, (224, 224, 3), dtype=np.uint8)  # textured, dark
    blurred = np.asarray(Image.fromarray(tissue).filter(ImageFilter.GaussianBlur(4)))
    half = tissue.copy()
    half[:, 112:] = 245
    bg, focus = scores(np.stack([glass, tissue, blurred, half]))
    np.testing.assert_allclose(bg, [1.0, 0.0, 0.0, 0.5], atol=0.01)
    assert focus[0] == 0 and focus[1] > 20 * focus[2] > 0


def test_tile_qc_fills_grid_order_and_checks_count() -> None:
    t = np.zeros((4, 16, 16, 3), np.uint8)
    t[2] = 255
    batches = [TileBatch(np.arange(2, 4), t[2:]), TileBatch(np.arange(0, 2), t[:2])]
    qc = tile_qc(batches, 4)
    np.testing.assert_array_equal(qc.background, [0, 0, 1, 0])  # tile 2 is white
    assert qc.as_array().shape == (4, 2)
    with pytest.raises(ValueError, match="delivered 2 of 4"):
        tile_qc(batches[:1], 4)


def _scores_by_definition(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores as defined, pixel by pixel over the half-resolution view."""
    half = tiles[:, ::2, ::2]
    background = (half.min(axis=3) > 220).mean(axis=(1, 2)).astype(np.float32)
    grey = half.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
           - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    return background, lap.var(axis=(1, 2)).astype(np.float32)


@pytest.mark.parametrize("px", [224, 65])
def test_vectorised_scores_equal_the_definition(px: int) -> None:
    rng = np.random.default_rng(px)
    tiles = rng.integers(180, 256, (6, px, px, 3), dtype=np.uint8)
    tiles[1, :, :, 2] = 221  # one channel at the threshold's edge
    tiles[2] = 255
    tiles[3, ::3] = 0
    bg, focus = scores(tiles[:, :, :, :])
    ref_bg, ref_focus = _scores_by_definition(tiles)
    np.testing.assert_array_equal(bg, ref_bg)
    np.testing.assert_array_equal(focus, ref_focus)
    view = tiles[:, 1:, 1:]  # a strided view, as batches of crops may be
    np.testing.assert_array_equal(scores(view)[0], _scores_by_definition(view)[0])
