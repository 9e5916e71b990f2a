"""Per-tile quality scores, read through the tile stream by the ``tiles`` stage.

``background``: fraction of a tile's pixels that are near-white glass (every channel
above ``WHITE``). ``focus``: variance of the 4-neighbour Laplacian of the grey image at
half resolution, a standard sharpness score: out-of-focus, smeared or empty tiles score
low. Scores are relative (they depend on stain and scanner), so they are stored, not
thresholded; sort or filter by them in QuPath or downstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from wsi_assist.stream import TileBatch

#: A pixel is background when all of R, G, B exceed this.
WHITE = 220
#: What the stored scores mean (``tile_qc`` attrs).
DESCRIPTION = (f"background: fraction of pixels with R, G, B > {WHITE}; focus: variance of "
               "the Laplacian of grey at half resolution (higher is sharper)")
#: ITU-R BT.601 luma weights.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class TileQC:
    """Scores per grid tile, in grid order, and the tiles read per second. ``damaged``:
    the tiles holding pixels of compressed data that is damaged but decodable (libjpeg
    decodes through such data with a warning only), as grid rows."""

    background: np.ndarray
    focus: np.ndarray
    tiles_per_s: float
    damaged: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if self.background.ndim != 1 or self.focus.shape != self.background.shape:
            raise ValueError("background and focus must be 1-D arrays of equal length")

    @property
    def n_damaged(self) -> int:
        return len(self.damaged)

    def as_array(self) -> np.ndarray:
        """(N, 2) float32: background, focus."""
        return np.stack([self.background, self.focus], axis=1).astype(np.float32)


def scores(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background fraction and focus of each of ``tiles`` (N, H, W, 3) uint8."""
    half = tiles[:, ::2, ::2]
    background = (half.min(axis=3) > WHITE).mean(axis=(1, 2))
    grey = half.astype(np.float32) @ LUMA
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
           - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    return background.astype(np.float32), lap.var(axis=(1, 2)).astype(np.float32)


def tile_qc(batches: Iterable[TileBatch], n: int) -> TileQC:
    """Scores of all ``n`` tiles from a tile stream."""
    background = np.full(n, np.nan, np.float32)
    focus = np.full(n, np.nan, np.float32)
    damaged = np.zeros(n, bool)
    t = time.perf_counter()
    for b in batches:
        background[b.index], focus[b.index] = scores(b.tiles)
        if b.damaged is not None:
            damaged[b.index] = b.damaged
    if np.isnan(background).any():
        raise ValueError(f"tile stream delivered {int((~np.isnan(background)).sum())} of "
                         f"{n} tiles")
    dt = time.perf_counter() - t
    return TileQC(background, focus, n / dt if dt > 0 else 0.0, np.flatnonzero(damaged))
