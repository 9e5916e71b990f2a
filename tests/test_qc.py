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
