"""Multichannel (fluorescence, CYX) images: which channel is nuclear, 8-bit scaling by
robust percentiles, display colours and additive pseudo-colour pictures.

A multichannel slide's pixels are one plane per channel in the slide's dtype (8- or
16-bit); nothing here assumes a channel count. The nuclear channel (DAPI or Hoechst by
name, else the one configured) drives tissue detection and tile focus; pictures for
people (the stored overview, the thumbnail) are pseudo-colour: each channel scaled
between its low and high percentile, tinted with its colour, and the tints added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_assist.errors import SlideError

RGB = tuple[int, int, int]

#: Channel names taken for the nuclear stain, case-insensitive.
NUCLEAR_NAME = re.compile(r"dapi|hoechst", re.IGNORECASE)
#: The nuclear channel's colour where the file gives none.
NUCLEAR_COLOR: RGB = (0, 90, 255)
#: Colours of the other channels, in order, where the file gives none.
PALETTE: tuple[RGB, ...] = ((0, 255, 0), (255, 0, 0), (255, 255, 0), (255, 0, 255),
                            (0, 255, 255), (255, 140, 0), (160, 90, 255), (255, 255, 255))
#: Default (low, high) percentiles a channel is scaled between.
PERCENTILES = (1.0, 99.5)
#: The high level is at least this fraction of the way from the low level to the
#: 99.99th percentile, so that a sparse marker (a few bright cells, the rest noise) is
#: not stretched until its noise fills the picture.
MIN_SPAN = 0.25
#: Pixels sampled per channel at most when measuring percentiles.
SAMPLE_PX = 4_000_000


def nuclear_channel(names: Sequence[str], spec: str | int = "auto") -> tuple[int, str]:
    """Index of the nuclear channel among ``names`` and how it was chosen.

    ``spec``: ``auto`` (the first name containing DAPI or Hoechst, else the first
    channel), a channel name (case-insensitive) or a 0-based index. A name or index the
    slide does not have is a SlideError listing its channels.
    """
    listed = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec < len(names):
            raise SlideError(f"channels.nuclear: index {spec} is out of range; the slide "
                             f"has {len(names)} channels ({listed})")
        return spec, "channels.nuclear (index)"
    if spec != "auto":
        hits = [i for i, n in enumerate(names) if n.casefold() == str(spec).casefold()]
        if not hits:
            raise SlideError(f"channels.nuclear: no channel named {spec!r}; the slide's "
                             f"channels are {listed}")
        return hits[0], "channels.nuclear (name)"
    for i, n in enumerate(names):
        if NUCLEAR_NAME.search(n):
            return i, "by name"
    return 0, "first channel (no DAPI or Hoechst channel by name)"


def display_colors(names: Sequence[str], given: Sequence[RGB | None] = ()) -> list[RGB]:
    """One colour per channel: the file's where it gives one, blue for DAPI or
    Hoechst, else the next colour of :data:`PALETTE`."""
    out: list[RGB] = []
    k = 0
    for i, name in enumerate(names):
        color = given[i] if i < len(given) else None
        if color is None and NUCLEAR_NAME.search(name):
            color = NUCLEAR_COLOR
        if color is None:
            color = PALETTE[k % len(PALETTE)]
            k += 1
        out.append((int(color[0]), int(color[1]), int(color[2])))
    return out


def levels(planes: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
           ) -> np.ndarray:
    """(C, 2) float64: each channel's low and high level in ``planes`` (H, W, C), its
    low and high percentile measured on at most :data:`SAMPLE_PX` pixels, the high one
    raised to :data:`MIN_SPAN` of the channel's range where it falls short; high > low."""
    if planes.ndim != 3:
        raise ValueError(f"planes must be (H, W, C), got {planes.shape}")
    step = max(1, int(np.ceil(np.sqrt(planes.shape[0] * planes.shape[1] / SAMPLE_PX))))
    sample = planes[::step, ::step].reshape(-1, planes.shape[2])
    out = np.zeros((planes.shape[2], 2), np.float64)
    if sample.size:
        lo, hi, top = np.percentile(sample, [*percentiles, 99.99], axis=0)
        out[:, 0], out[:, 1] = lo, np.maximum(hi, lo + MIN_SPAN * (top - lo))
    out[:, 1] = np.maximum(out[:, 1], out[:, 0] + 1e-6 if planes.dtype.kind == "f"
                           else out[:, 0] + 1)
    return out


def scale(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """``plane`` mapped linearly from [low, high] to [0, 1] (float32, clipped)."""
    out = (plane.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def to_uint8(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """``plane`` scaled to 8 bits between ``low`` (0) and ``high`` (255)."""
    return np.rint(scale(plane, low, high) * 255).astype(np.uint8)


def pseudo_color(planes: np.ndarray, colors: Sequence[RGB], lv: np.ndarray) -> np.ndarray:
    """An 8-bit RGB picture of ``planes`` (H, W, C): each channel scaled between its
    levels ``lv`` (C, 2), tinted with its colour, the tints added (clipped at white)."""
    h, w, c = planes.shape
    if len(colors) != c or lv.shape != (c, 2):
        raise ValueError(f"{c} channels need {c} colours and (C, 2) levels, got "
                         f"{len(colors)} and {lv.shape}")
    out = np.zeros((h, w, 3), np.float32)
    for k in range(c):
        tint = np.asarray(colors[k], np.float32)
        out += scale(planes[..., k], lv[k, 0], lv[k, 1])[..., None] * tint
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def nuclear_rgb(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """The nuclear channel as a grey RGB image (bright nuclei on a dark background),
    8-bit between ``low`` and ``high``: what tissue detection is given."""
    grey = to_uint8(plane, low, high)
    return np.repeat(grey[..., None], 3, axis=2)



@dataclass(frozen=True)
class Pictures:
    """What the tissue and tiles stages draw from a multichannel overview: the nuclear
    channel (index, how it was chosen, and as grey RGB for tissue detection), each
    channel's levels (C, 2) and colour, and the pseudo-colour picture (H, W, 3)."""

    names: tuple[str, ...]
    index: int
    how: str
    levels: np.ndarray
    colors: tuple[RGB, ...]
    nuclear: np.ndarray
    color: np.ndarray

    def __post_init__(self) -> None:
        c = len(self.names)
        if not 0 <= self.index < c or self.levels.shape != (c, 2) or len(self.colors) != c:
            raise ValueError(f"{c} channels need an index in range, (C, 2) levels and C "
                             f"colours, got {self.index}, {self.levels.shape}, "
                             f"{len(self.colors)}")
        for pic in (self.nuclear, self.color):
            if pic.ndim != 3 or pic.shape[2] != 3 or pic.dtype != np.uint8:
                raise ValueError(f"pictures must be (H, W, 3) uint8, got {pic.dtype} "
                                 f"{pic.shape}")

    @property
    def nuclear_name(self) -> str:
        return self.names[self.index]


def pictures(planes: np.ndarray, names: Sequence[str],
             given_colors: Sequence[RGB | None] = (), nuclear: str | int = "auto",
             percentiles: tuple[float, float] = PERCENTILES) -> Pictures:
    """The :class:`Pictures` of an overview ``planes`` (H, W, C) with channels ``names``,
    the file's colours ``given_colors``, the ``nuclear`` channel spec (see
    :func:`nuclear_channel`) and the scaling ``percentiles``."""
    if planes.ndim != 3 or planes.shape[2] != len(names):
        raise ValueError(f"planes {planes.shape} do not hold {len(names)} channels")
    index, how = nuclear_channel(names, nuclear)
    lv = levels(planes, percentiles)
    colors = display_colors(names, given_colors)
    return Pictures(names=tuple(names), index=index, how=how, levels=lv,
                    colors=tuple(colors),
                    nuclear=nuclear_rgb(planes[..., index], *lv[index]),
                    color=pseudo_color(planes, colors, lv))
