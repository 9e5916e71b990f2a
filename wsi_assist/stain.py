"""Stains of a brightfield slide: optical density and colour deconvolution.

Optical density follows QuPath: ``OD = -log10(max(I, 1) / I0)`` per channel, with
``I0`` the background (white) value of each channel. Deconvolution multiplies OD by the
inverse of the row-normalised stain matrix (Ruifrok & Johnston), whose third row is the
residual (the cross product of the first two when not given).

:class:`StainVectors` is what a slide's analysis is run with: the kind of image, the stain
names, the three vectors, the background, and where they came from. The defaults are
QuPath's ("H-DAB default", "H&E default").

Per slide (see :func:`slide_stains`): the background (white) is estimated from the brightest
glass (:func:`estimate_background`), the kind of image from how the tissue's OD is explained
by the H&E and H-DAB pairs (:func:`detect_kind`), and the two stain vectors as QuPath's
"Estimate stain vectors" and Macenko et al. (2009) do (:func:`estimate_vectors`), with the
defaults as fallback (``source="default"`` and a ``reason``) and the config as override.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np

from wsi_assist.settings import StainParams

log = logging.getLogger(__name__)

ImageKind = Literal["brightfield-he", "brightfield-hdab", "brightfield-other", "fluorescence"]
VectorSource = Literal["estimated", "default", "config"]

HEMATOXYLIN = (0.65111, 0.70119, 0.29049)
EOSIN = (0.2159, 0.8012, 0.5581)
DAB = (0.26917, 0.56824, 0.77759)
WHITE = (255.0, 255.0, 255.0)

#: How a kind and a source read in reports.
KIND_LABELS: dict[str, str] = {
    "brightfield-he": "Brightfield H&E", "brightfield-hdab": "Brightfield H-DAB",
    "brightfield-other": "Other brightfield", "fluorescence": "Fluorescence"}
SOURCE_LABELS: dict[str, str] = {
    "estimated": "estimated stain vectors", "default": "default stain vectors",
    "config": "stain vectors from the config"}


@dataclass(frozen=True)
class StainVectors:
    """Three stain OD vectors (rows of ``matrix``, unit length) and the background."""

    kind: ImageKind
    names: tuple[str, str, str]
    matrix: np.ndarray
    background: tuple[float, float, float] = WHITE
    source: VectorSource = "default"
    #: Why the defaults were used (``source="default"``), else None.
    reason: str | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, np.float64)
        if m.shape != (3, 3) or not np.isfinite(m).all():
            raise ValueError(f"matrix must be 3 x 3 finite values, got {m.shape}")
        if abs(np.linalg.det(m)) < 1e-6:
            raise ValueError("stain vectors must be linearly independent")
        if min(self.background) <= 0:
            raise ValueError(f"background must be positive, got {self.background!r}")
        if self.kind not in get_args(ImageKind) or self.source not in get_args(VectorSource):
            raise ValueError(f"unknown kind {self.kind!r} or source {self.source!r}")

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "names": list(self.names),
                "vectors": np.asarray(self.matrix).round(5).tolist(),
                "background": list(self.background), "source": self.source,
                "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StainVectors:
        """The inverse of :meth:`to_json`; ValueError when ``d`` is not one."""
        try:
            names = tuple(str(n) for n in d["names"])
            bg = tuple(float(v) for v in d["background"])
            if len(names) != 3 or len(bg) != 3:
                raise ValueError(f"3 names and 3 background values, got {names}, {bg}")
            return cls(d["kind"], (names[0], names[1], names[2]),
                       np.asarray(d["vectors"], np.float64), (bg[0], bg[1], bg[2]),
                       d["source"], None if d.get("reason") is None else str(d["reason"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not stain vectors: {e!r}") from None

    @property
    def label(self) -> str:
        """In plain words: ``Brightfield H-DAB (estimated stain vectors)``."""
        if self.kind == "fluorescence":
            return "Fluorescence (stain vectors do not apply)"
        return f"{KIND_LABELS[self.kind]} ({SOURCE_LABELS[self.source]})"

    def angles_to_default(self) -> list[float]:
        """Degrees between each of the two stain vectors and the default of its kind."""
        ref = default_vectors("brightfield-hdab" if self.names[1] == "DAB"
                              else "brightfield-he").matrix
        return [round(angle_deg(self.matrix[i], ref[i]), 2) for i in (0, 1)]


def stain_matrix(first: tuple[float, float, float], second: tuple[float, float, float],
                 third: tuple[float, float, float] | None = None) -> np.ndarray:
    """Row-normalised (3, 3) matrix; the residual is ``first x second`` when not given."""
    rows = [np.asarray(first, np.float64), np.asarray(second, np.float64)]
    rows.append(np.cross(rows[0], rows[1]) if third is None else np.asarray(third, np.float64))
    m = np.stack(rows)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def default_vectors(kind: ImageKind) -> StainVectors:
    """QuPath's default vectors for ``kind`` (H&E for other brightfield)."""
    if kind == "brightfield-hdab":
        return StainVectors(kind, ("Hematoxylin", "DAB", "Residual"),
                            stain_matrix(HEMATOXYLIN, DAB))
    return StainVectors(kind, ("Hematoxylin", "Eosin", "Residual"),
                        stain_matrix(HEMATOXYLIN, EOSIN))


def optical_density(rgb: np.ndarray, background: tuple[float, float, float] = (255, 255, 255)
                    ) -> np.ndarray:
    """float32 OD of uint8 RGB (..., 3) against ``background``. 8-bit pixels are looked
    up in a table of the 256 values per channel, computed by the same float32 operations
    (equal to computing each pixel for all 2**24 colours; 3.5x faster on a 1,104 px
    nuclei block)."""
    bg = np.asarray(background, np.float32)
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        levels = np.maximum(np.arange(256, dtype=np.float32), 1.0)
        table = (-np.log10(levels[:, None] / bg)).T.ravel()  # channel c at 256 c + value
        idx = rgb[..., :3].astype(np.intp)
        idx[..., 1] += 256
        idx[..., 2] += 512
        return table.take(idx)
    i = np.maximum(rgb.astype(np.float32)[..., :3], 1.0)
    return -np.log10(i / bg)


def deconvolve(rgb: np.ndarray, stains: StainVectors) -> np.ndarray:
    """Per-stain OD (..., 3), in the order of ``stains.names``."""
    od = optical_density(rgb, stains.background)
    inv = np.linalg.inv(np.asarray(stains.matrix, np.float64)).astype(np.float32)
    return od @ inv


def angle_deg(a: np.ndarray | tuple[float, ...], b: np.ndarray | tuple[float, ...]) -> float:
    """The angle between two (OD) vectors, degrees."""
    u, v = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def estimate_background(rgb: np.ndarray, exclude: np.ndarray | None = None, *,
                        brightest: float = 0.1, min_white: float = 180.0,
                        max_tint: float = 30.0) -> tuple[float, float, float]:
    """The white of a brightfield image: the per-channel median of its brightest pixels.

    As QuPath takes the background from bright glass: of the pixels not in ``exclude``
    (the tissue mask; all pixels when too few are left), the ``brightest`` fraction by mean
    brightness. Used only when it looks like glass (every channel >= ``min_white``,
    channels within ``max_tint`` of each other); else white (255, 255, 255).
    """
    px = np.asarray(rgb)[..., :3].reshape(-1, 3)
    if exclude is not None:
        keep = ~np.asarray(exclude, bool).reshape(-1)
        if keep.sum() >= 100:
            px = px[keep]
    if len(px) == 0:
        return WHITE
    grey = px.astype(np.float32).mean(axis=1)
    top = px[grey >= np.quantile(grey, 1 - brightest)]
    white = np.median(top.astype(np.float64), axis=0)
    if white.min() < min_white or white.max() - white.min() > max_tint:
        log.info("background %s does not look like glass; using white", white.round(1))
        return WHITE
    return (float(white[0]), float(white[1]), float(white[2]))


def _unit_od(rgb_pixels: np.ndarray, background: tuple[float, float, float],
             min_od: float, max_od: float, grey_deg: float) -> np.ndarray:
    """OD (N, 3) of the stained pixels: norm in [min_od, max_od], no channel at or above
    the background, not grey (within ``grey_deg`` of (1, 1, 1): dust, pen, folds)."""
    od = optical_density(np.asarray(rgb_pixels).reshape(-1, 3), background).astype(np.float64)
    norm = np.linalg.norm(od, axis=1)
    cos_grey = od.sum(axis=1) / np.sqrt(3) / np.maximum(norm, 1e-12)
    keep = ((norm >= min_od) & (norm <= max_od) & (od.min(axis=1) > 0)
            & (cos_grey < np.cos(np.radians(grey_deg))))
    return od[keep]


def cone_angle_deg(od: np.ndarray, a: tuple[float, float, float],
                   b: tuple[float, float, float]) -> np.ndarray:
    """Per OD vector (N, 3), the angle (degrees) to the nearest non-negative mix of stains
    ``a`` and ``b``: 0 when the pixel is some amount of ``a`` plus some amount of ``b``."""
    u = od / np.maximum(np.linalg.norm(od, axis=1, keepdims=True), 1e-12)
    m = stain_matrix(a, b)[:2].T  # (3, 2)
    coef = u @ np.linalg.pinv(m).T
    dist_plane = np.linalg.norm(u - coef @ m.T, axis=1)
    cos_single = np.clip(u @ m, 0.0, 1.0).max(axis=1)
    dist = np.where((coef >= 0).all(axis=1), dist_plane, np.sqrt(1 - cos_single ** 2))
    return np.degrees(np.arcsin(np.clip(dist, 0.0, 1.0)))


@dataclass(frozen=True)
class KindEvidence:
    """How the stained tissue pixels are explained by the H&E and the H-DAB pairs."""

    n_pixels: int
    n_stained: int
    #: Fraction of stained pixels within ``fit_deg`` of the H&E or the H-DAB mixes.
    explained: float
    #: Fractions of stained pixels clearly closer (by ``margin_deg``) to H-DAB / to H&E.
    dab_like: float
    eosin_like: float


def kind_evidence(rgb_pixels: np.ndarray, background: tuple[float, float, float] = WHITE,
                  *, min_od: float = 0.15, max_od: float = 2.5, fit_deg: float = 20.0,
                  margin_deg: float = 3.0) -> KindEvidence:
    """What :func:`detect_kind` decides from: per stained pixel, the angle of its OD to
    the haematoxylin+eosin mixes and to the haematoxylin+DAB mixes. Pure haematoxylin is
    both; eosin (absorbs green most) and DAB (brown, absorbs blue most) lie 15 to 19
    degrees outside each other's pair. ``fit_deg`` is wide because real eosin and
    haematoxylin stray from the defaults (20 degrees on HE_example.ome.tif)."""
    n = int(np.asarray(rgb_pixels).size // 3)
    od = _unit_od(rgb_pixels, background, min_od, max_od, grey_deg=5.0)
    if len(od) == 0:
        return KindEvidence(n, 0, 0.0, 0.0, 0.0)
    he = cone_angle_deg(od, HEMATOXYLIN, EOSIN)
    hdab = cone_angle_deg(od, HEMATOXYLIN, DAB)
    return KindEvidence(n, len(od), float((np.minimum(he, hdab) <= fit_deg).mean()),
                        float((hdab + margin_deg < he).mean()),
                        float((he + margin_deg < hdab).mean()))


def detect_kind(rgb_pixels: np.ndarray, dark_background: bool,
                background: tuple[float, float, float] = WHITE, *, min_pixels: int = 200,
                min_explained: float = 0.5, min_dab: float = 0.02) -> ImageKind:
    """The kind of image from its tissue pixels (N, 3) uint8.

    Fluorescence when the background is dark. Brightfield: ``brightfield-other`` when
    fewer than ``min_pixels`` tissue pixels are stained or fewer than ``min_explained`` of
    them are mixes of haematoxylin with eosin or DAB (see :func:`kind_evidence`);
    ``brightfield-hdab`` when at least ``min_dab`` of the stained pixels are DAB-like and
    they outnumber the eosin-like ones; else ``brightfield-he``.
    """
    if dark_background:
        return "fluorescence"
    ev = kind_evidence(rgb_pixels, background)
    kind: ImageKind
    if ev.n_stained < min_pixels or ev.explained < min_explained:
        kind = "brightfield-other"
    elif ev.dab_like >= min_dab and ev.dab_like > ev.eosin_like:
        kind = "brightfield-hdab"
    else:
        kind = "brightfield-he"
    log.info("image kind %s: %d of %d tissue pixels stained, %.0f%% explained by H&E or "
             "H-DAB, %.1f%% DAB-like, %.1f%% eosin-like", kind, ev.n_stained, ev.n_pixels,
             100 * ev.explained, 100 * ev.dab_like, 100 * ev.eosin_like)
    return kind


def estimate_vectors(rgb_pixels: np.ndarray, kind: ImageKind,
                     background: tuple[float, float, float] = WHITE, *,
                     min_od: float = 0.15, max_od: float = 1.5, percentile: float = 1.0,
                     grey_deg: float = 8.6, min_pixels: int = 500,
                     max_angle_deg: float = 30.0, min_separation_deg: float = 5.0
                     ) -> StainVectors:
    """Two stain vectors estimated from tissue pixels (N, 3) uint8, as Macenko et al. and
    QuPath's "Estimate stain vectors" do.

    OD against ``background``; pixels with OD norm in [``min_od``, ``max_od``] (faint
    and very dark or saturated pixels dropped) and not grey; the plane of the two
    largest eigenvectors of their covariance; per pixel the angle in that plane; the
    vectors at the ``percentile`` and ``100 - percentile`` angles, ordered haematoxylin
    first (the pair of assignments closest to the defaults). Falls back to the defaults
    of ``kind`` (``source="default"``, ``reason`` said and logged) when fewer than
    ``min_pixels`` remain or the estimate is implausible: a vector with a negative part,
    the two less than ``min_separation_deg`` apart, haematoxylin (and, for H&E and H-DAB,
    the second stain) more than ``max_angle_deg`` from its default.
    """
    default = replace(default_vectors(kind), background=background)
    if kind == "fluorescence":
        return replace(default, reason="fluorescence: stain vectors do not apply")

    def fallback(why: str) -> StainVectors:
        log.warning("stain vectors: defaults used: %s", why)
        return replace(default, reason=why)

    n = int(np.asarray(rgb_pixels).size // 3)
    od = _unit_od(rgb_pixels, background, min_od, max_od, grey_deg)
    if n == 0:
        return fallback("no tissue pixels to estimate them from (no tissue found)")
    if len(od) < min_pixels:
        return fallback(f"{len(od)} stained pixels among {n} tissue pixels; at least "
                        f"{min_pixels} are needed")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    e1, e2 = vecs[:, 2], vecs[:, 1]  # eigh sorts ascending
    e1 = e1 if e1.sum() >= 0 else -e1  # the first axis points into positive OD
    phi = np.arctan2(od @ e2, od @ e1)
    lo, hi = np.percentile(phi, [percentile, 100 - percentile])
    found = [np.cos(t) * e1 + np.sin(t) * e2 for t in (lo, hi)]
    found = [v / np.linalg.norm(v) for v in found]
    ref = default.matrix
    if (angle_deg(found[0], ref[0]) + angle_deg(found[1], ref[1])
            > angle_deg(found[1], ref[0]) + angle_deg(found[0], ref[1])):
        found.reverse()
    h, s = found
    names = ("haematoxylin", default.names[1].lower())
    if min(h.min(), s.min()) < -0.05:
        return fallback(f"an estimated vector has negative OD: {h.round(3)}, {s.round(3)}")
    sep = angle_deg(h, s)
    if sep < min_separation_deg:
        return fallback(f"the two estimated vectors are {sep:.1f} degrees apart, not "
                        "independent")
    checked = [0, 1] if kind in ("brightfield-he", "brightfield-hdab") else [0]
    for i in checked:
        off = angle_deg(found[i], ref[i])
        if off > max_angle_deg:
            return fallback(f"estimated {names[i]} is {off:.1f} degrees from the default "
                            f"(more than {max_angle_deg:g})")
    h, s = np.clip(h, 0, None), np.clip(s, 0, None)
    est = StainVectors(kind, default.names, stain_matrix(_triple(h), _triple(s)),
                       background, "estimated")
    log.info("stain vectors estimated from %d pixels: %s; %s degrees from the defaults",
             len(od), est.matrix[:2].round(3).tolist(), est.angles_to_default())
    return est


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def slide_stains(overview: np.ndarray, mask: np.ndarray, dark_background: bool,
                 params: StainParams | None = None, max_pixels: int = 200_000
                 ) -> StainVectors:
    """A slide's kind and stain vectors from the overview pixels in its tissue ``mask``
    (at most ``max_pixels`` of them, a fixed random sample), with the config's overrides:
    ``kind``, ``vectors`` (auto, default or the given config vectors), ``background``."""
    params = params or StainParams()
    rgb = np.asarray(overview)[..., :3]
    pixels = rgb[np.asarray(mask, bool)]
    if len(pixels) > max_pixels:
        rows = np.random.default_rng(0).choice(len(pixels), max_pixels, replace=False)
        pixels = pixels[np.sort(rows)]
    if params.background is not None:
        background = params.background
    else:
        background = WHITE if dark_background else estimate_background(rgb, exclude=mask)
    kind: ImageKind
    if params.kind != "auto":
        kind = params.kind
    elif params.vectors == "config":
        kind = "brightfield-hdab" if params.dab is not None else "brightfield-he"
    else:
        kind = detect_kind(pixels, dark_background, background)
    if kind == "fluorescence":
        return estimate_vectors(pixels, kind, background)  # the defaults, saying why
    if params.vectors == "default":
        return replace(default_vectors(kind), background=background,
                       reason="stain.vectors is 'default' in the config")
    if params.vectors == "config" and params.hematoxylin is not None:
        second = params.dab if params.dab is not None else params.eosin
        name = "DAB" if params.dab is not None else "Eosin"
        if second is None:
            raise ValueError("stain.vectors 'config' needs eosin or dab")
        return StainVectors(kind, ("Hematoxylin", name, "Residual"),
                            stain_matrix(params.hematoxylin, second), background, "config")
    return estimate_vectors(pixels, kind, background)
