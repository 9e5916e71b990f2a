"""Nuclei on fluorescence images, as QuPath's "Cell detection" finds them on the nuclear
channel, with per-nucleus channel intensities.

The detection image is the nuclear channel (DAPI/Hoechst of a multichannel slide, see
:func:`wsi_assist.channels.nuclear_channel`; on an RGB fluorescence scan the channel that
carries the nuclear signal, :func:`rgb_nuclear_channel`) in the slide's own intensity
units. From there the steps are those of :func:`wsi_assist.nuclei.segment`, the same as on
brightfield: background subtraction (opening by reconstruction, ``backgroundRadiusMicrons``),
Laplacian of Gaussian watershed, ``threshold`` on the mean background-subtracted intensity
of each candidate, split by shape and the ``minAreaMicrons`` .. ``maxAreaMicrons`` rule.

QuPath's ``threshold`` on fluorescence is an intensity, in the image's units (it depends
on the bit depth and the exposure): ``nuclei.fluorescenceThreshold`` sets it so; unset,
it is ``nuclei.fluorescenceThresholdFraction`` of the nuclear channel's spread over the
slide's tissue (its 99.5th minus its 1st percentile at overview resolution), fixed per
slide so that every tile is judged alike.

Each nucleus is measured on every channel, under QuPath's names (``Nucleus: DAPI mean``,
``Nucleus: CD8 (Opal 520) sum``, ... with the statistics of
:data:`wsi_assist.nuclei.INTENSITY_STATS`), on the raw channel values (no background
subtracted). There are no DAB scores on fluorescence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_assist import nuclei as nu
from wsi_assist.settings import NucleiParams

#: Percentiles of the nuclear channel over tissue whose difference the automatic
#: threshold is a fraction of.
SPREAD_PERCENTILES = (1.0, 99.5)
#: On an RGB fluorescence scan blue is taken for the nuclear channel unless another
#: channel spreads this many times wider over the tissue.
BRIGHTER_THAN_BLUE = 1.5


@dataclass(frozen=True)
class Setup:
    """How a slide's fluorescence nuclei are found: channel ``names``, the ``nuclear``
    channel's index and how it was chosen, and the detection ``threshold`` (the slide's
    intensity units) and where it came from."""

    names: tuple[str, ...]
    nuclear: int
    how: str
    threshold: float
    threshold_from: str

    def __post_init__(self) -> None:
        if not 0 <= self.nuclear < len(self.names):
            raise ValueError(f"nuclear channel {self.nuclear} out of range for "
                             f"{len(self.names)} channels")
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be finite and >= 0, got {self.threshold!r}")

    @property
    def nuclear_name(self) -> str:
        return self.names[self.nuclear]


def measurement_names(names: Sequence[str]) -> tuple[str, ...]:
    """Shape measurements, then per channel QuPath's ``Nucleus: <channel> <stat>``."""
    return nu.SHAPE_NAMES + tuple(f"Nucleus: {c} {stat}" for c in names
                                  for stat in nu.INTENSITY_STATS)


def rgb_nuclear_channel(pixels: np.ndarray) -> tuple[int, str]:
    """The channel of an RGB fluorescence scan that carries the nuclear stain, from its
    tissue pixels (N, 3): blue (DAPI, Hoechst), unless another channel spreads
    :data:`BRIGHTER_THAN_BLUE` times wider (then the widest: the brightest stain)."""
    spread = _spread(np.asarray(pixels, np.float64).reshape(-1, 3))
    widest = int(np.argmax(spread))
    if spread[widest] > BRIGHTER_THAN_BLUE * spread[2]:
        return widest, "brightest channel of the RGB scan"
    return 2, "blue channel of the RGB scan (DAPI/Hoechst)"


def auto_threshold(nuclear_pixels: np.ndarray, fraction: float) -> float:
    """``fraction`` of the spread of the nuclear channel's tissue pixels (see module doc);
    0 when there are none."""
    spread = _spread(np.asarray(nuclear_pixels, np.float64).reshape(-1, 1))
    return float(fraction * spread[0])


def setup(overview: np.ndarray, tissue: np.ndarray, names: Sequence[str],
          nuclear: tuple[int, str] | None, params: NucleiParams) -> Setup:
    """The :class:`Setup` of a slide from its raw overview (H, W, C) and tissue mask
    (H, W): ``nuclear`` is the (index, how chosen) of a multichannel slide's nuclear
    channel, None for an RGB scan (then chosen by :func:`rgb_nuclear_channel`)."""
    if overview.ndim != 3 or overview.shape[2] != len(names):
        raise ValueError(f"overview {overview.shape} does not hold {len(names)} channels")
    if tissue.shape != overview.shape[:2]:
        raise ValueError(f"tissue mask {tissue.shape} != overview {overview.shape[:2]}")
    pixels = overview[tissue] if tissue.any() else overview.reshape(-1, overview.shape[2])
    index, how = nuclear if nuclear is not None else rgb_nuclear_channel(pixels)
    if params.fluorescenceThreshold is not None:
        thr, source = params.fluorescenceThreshold, "nuclei.fluorescenceThreshold"
    else:
        thr = auto_threshold(pixels[:, index], params.fluorescenceThresholdFraction)
        source = (f"{params.fluorescenceThresholdFraction:g} x the spread (99.5th - 1st "
                  f"percentile) of {names[index]} over the tissue")
    return Setup(tuple(names), int(index), how, float(thr), source)


def detect(planes: np.ndarray, mpp: float, fl: Setup, params: NucleiParams | None = None,
           core: nu.Box | np.ndarray | None = None, valid: nu.Box | None = None
           ) -> nu.Nuclei:
    """Nuclei of ``planes`` (H, W, C), one plane per channel of ``fl.names`` (8/16-bit or
    float), ``mpp`` µm wide pixels; ``core`` and ``valid`` as for
    :func:`wsi_assist.nuclei.detect_nuclei`. Coordinates in the pixel frame of ``planes``."""
    planes = np.asarray(planes)
    if planes.ndim != 3 or planes.shape[2] != len(fl.names):
        raise ValueError(f"planes must be (H, W, {len(fl.names)}), got {planes.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp!r}")
    params = NucleiParams() if params is None else params
    names = measurement_names(fl.names)
    img, scale = at_pixel_size(planes, mpp, params.requestedPixelSizeMicrons)
    px = mpp * scale
    p = params.model_copy(update={"threshold": fl.threshold, "maxBackground": 0.0,
                                  "excludeDAB": False})
    inside = None if valid is None else tuple(round(v / scale) for v in valid)
    labels, _ = nu.segment(img[..., fl.nuclear], px, p, None, None, inside)
    channels = [img[..., k] for k in range(img.shape[2])]
    return nu.measured_nuclei(labels, channels, names, px, scale, params, core)


def at_pixel_size(planes: np.ndarray, mpp: float, requested: float
                  ) -> tuple[np.ndarray, float]:
    """``planes`` (H, W, C) as float32 at ``requested`` µm/px (box filter per channel)
    unless within tolerance or coarser; and image px per returned pixel."""
    out = np.asarray(planes, np.float32)
    if mpp >= requested * (1 - nu.PIXEL_SIZE_TOLERANCE):
        return out, 1.0
    from PIL import Image

    h, w = out.shape[:2]
    f = requested / mpp
    size = (max(1, round(w / f)), max(1, round(h / f)))
    small = [np.asarray(Image.fromarray(np.ascontiguousarray(out[..., k]), mode="F")
                        .resize(size, Image.Resampling.BOX)) for k in range(out.shape[2])]
    return np.stack(small, axis=-1), w / size[0]


def channel_mean_scores(found: nu.Nuclei, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per channel, the mean over nuclei of ``Nucleus: <channel> mean`` (None without
    nuclei), keyed by :func:`channel_mean_key`, as the report's score table shows them."""
    out = {}
    for c in names:
        col = found.column(f"Nucleus: {c} mean").astype(np.float64) if len(found) else None
        value = float(np.nanmean(col)) if col is not None and np.isfinite(col).any() else None
        out[channel_mean_key(c)] = {
            "value": value,
            "definition": f"mean over nuclei of Nucleus: {c} mean (the slide's intensity "
                          "units)"}
    return out


def channel_mean_key(channel: str) -> str:
    """The score name of a channel's mean of nucleus means (shown as it is)."""
    return f"Nucleus: {channel} mean, mean of nuclei"


#: QuPath parameters that mean nothing on fluorescence (optical density, DAB scoring,
#: our brightfield stroma and ink rejection).
BRIGHTFIELD_ONLY = ("detectionImageBrightfield", "excludeDAB", "thresholdCompartment",
                    "thresholdPositive1", "thresholdPositive2", "thresholdPositive3",
                    "singleThreshold", "minNucleusContrast", "contrastRingMicrons",
                    "maxStainAngle", "maxBackground")


def parameters(fl: Setup, params: NucleiParams) -> dict[str, Any]:
    """The parameters a fluorescence detection ran with, by QuPath's names: the
    detection channel and the threshold used (and where it came from)."""
    kept = {k: v for k, v in params.qupath().items() if k not in BRIGHTFIELD_ONLY}
    return {"detectionImage": fl.nuclear_name, **kept, "threshold": fl.threshold,
            "thresholdFrom": fl.threshold_from}


def _spread(pixels: np.ndarray) -> np.ndarray:
    if not len(pixels):
        return np.zeros(pixels.shape[1])
    lo, hi = np.percentile(pixels, SPREAD_PERCENTILES, axis=0)
    return np.asarray(hi - lo, np.float64)
