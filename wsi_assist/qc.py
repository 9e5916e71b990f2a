"""Per-tile quality scores, read through the tile stream by the ``tiles`` stage.

``background``: fraction of a tile's pixels that are near-white glass (every channel
above ``WHITE``). ``focus``: variance of the 4-neighbour Laplacian of the grey image at
half resolution, a standard sharpness score: out-of-focus, smeared or empty tiles score
low. Scores are relative (they depend on stain and scanner), so they are stored, not
thresholded; sort or filter by them in QuPath or downstream.

Multichannel (fluorescence) tiles (:class:`ChannelScores`): ``background`` is the
fraction of pixels dark in every channel (below :data:`DARK` of the channel's range
between its low and high percentile), ``focus`` the same Laplacian variance on the
nuclear channel scaled to 0-255 between its percentiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from wsi_assist.channels import scale
from wsi_assist.stream import TileBatch

#: A pixel is background when all of R, G, B exceed this.
WHITE = 220
#: What the stored scores mean (``tile_qc`` attrs).
DESCRIPTION = (f"background: fraction of pixels with R, G, B > {WHITE}; focus: variance of "
               "the Laplacian of grey at half resolution (higher is sharper)")
#: ITU-R BT.601 luma weights.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: A multichannel pixel is background when every channel is below this fraction of
#: its range between its low and high percentile.
DARK = 0.05

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


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
    """Background fraction and focus of each of ``tiles`` (N, H, W, 3) uint8.

    Vectorised over the batch: the half-resolution view is copied once into a contiguous
    array, the channel minimum is two element-wise minima (a reduction over a strided
    3-wide axis is several times slower) and the count of glass pixels one reduction."""
    half = np.ascontiguousarray(tiles[:, ::2, ::2])
    low = np.minimum(np.minimum(half[..., 0], half[..., 1]), half[..., 2])
    glass = np.count_nonzero((low > WHITE).reshape(len(low), -1), axis=1)
    background = glass / max(1, low.shape[1] * low.shape[2])
    grey = half.astype(np.float32) @ LUMA
    return background.astype(np.float32), laplacian_variance(grey)


def laplacian_variance(grey: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each of ``grey`` (N, H, W) float32."""
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
           - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    return lap.var(axis=(1, 2)).astype(np.float32)


@dataclass(frozen=True)
class ChannelScores:
    """Scores of multichannel tiles (N, H, W, C): ``nuclear`` the channel index focus
    is measured on, ``levels`` (C, 2) each channel's low and high percentile."""

    nuclear: int
    levels: np.ndarray

    def __post_init__(self) -> None:
        if self.levels.ndim != 2 or self.levels.shape[1] != 2 or not (
                0 <= self.nuclear < len(self.levels)):
            raise ValueError(f"levels must be (C, 2) and nuclear a channel index, got "
                             f"{self.levels.shape}, {self.nuclear}")

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = tiles[:, ::2, ::2]
        lo, hi = self.levels[:, 0], self.levels[:, 1]
        background = (half <= lo + DARK * (hi - lo)).all(axis=3).mean(axis=(1, 2))
        k = self.nuclear
        grey = scale(half[..., k], lo[k], hi[k]) * np.float32(255)
        return background.astype(np.float32), laplacian_variance(grey)


def channel_description(nuclear: str, percentiles: tuple[float, float]) -> str:
    """What :class:`ChannelScores` mean, for the ``tile_qc`` attrs."""
    lo, hi = percentiles
    return (f"background: fraction of pixels below {DARK:.0%} of every channel's range "
            f"between its {lo:g}th and {hi:g}th percentile on the thumbnail; focus: "
            f"variance of the Laplacian of the nuclear channel ({nuclear}, scaled to "
            "0-255 between those percentiles) at half resolution (higher is sharper)")


def tile_qc(batches: Iterable[TileBatch], n: int, score: Scorer = scores) -> TileQC:
    """Scores of all ``n`` tiles from a tile stream (``score``: :func:`scores` for RGB
    tiles, a :class:`ChannelScores` for multichannel ones)."""
    background = np.full(n, np.nan, np.float32)
    focus = np.full(n, np.nan, np.float32)
    damaged = np.zeros(n, bool)
    t = time.perf_counter()
    for b in batches:
        background[b.index], focus[b.index] = score(b.tiles)
        if b.damaged is not None:
            damaged[b.index] = b.damaged
    if np.isnan(background).any():
        raise ValueError(f"tile stream delivered {int((~np.isnan(background)).sum())} of "
                         f"{n} tiles")
    dt = time.perf_counter() - t
    return TileQC(background, focus, n / dt if dt > 0 else 0.0, np.flatnonzero(damaged))
