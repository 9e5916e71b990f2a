"""Nuclei as QuPath's "Positive cell detection" finds, measures and scores them.

:func:`detect_nuclei` follows the steps of QuPath's watershed cell detection (read in its
source, written anew here with scipy and scikit-image), at ``requestedPixelSizeMicrons``:

1. the detection image: the optical-density sum of the RGB channels (or the deconvolved
   haematoxylin), optionally median filtered;
2. background subtraction: a circular minimum filter of ``backgroundRadiusMicrons``
   reconstructed by dilation under the image (opening by reconstruction), or a plain
   opening; nuclei on a background above ``maxBackground`` (and twice the radius around
   it) are discarded;
3. a Laplacian of Gaussian (``sigmaMicrons``), watershed from its regional maxima over
   the pixels where it is positive (the over-segmented nucleus candidates);
4. candidates whose mean background-subtracted density exceeds ``threshold`` are kept and
   merged with their kept neighbours; touching nuclei are split again by a watershed on
   the distance transform ("split by shape", ``watershedPostProcess``);
5. a one-pixel boundary refinement with a narrower LoG, filled outlines, and the area
   (``minAreaMicrons`` .. ``maxAreaMicrons``) and intensity checks.

Each nucleus gets an outline (a polygon), a centroid and QuPath's measurements, named as
QuPath names them (``Nucleus: Area µm^2``, ``Nucleus: DAB OD mean``, ...); per-stain
intensities come from colour deconvolution with the slide's :class:`StainVectors`.
:func:`score_positivity` classes nuclei by mean nuclear DAB density (QuPath's
``thresholdPositive1..3``, or one threshold: Positive/Negative) and gives Positive %,
H-score and counts per intensity class, on H-DAB slides only: on any other kind of slide
the DAB scores are "not applicable", with the reason, never a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from wsi_assist.nuclei_morph import h_maxima_by_object, reconstruct_by_dilation, watershed_lines
from wsi_assist.settings import NucleiParams
from wsi_assist.stain import StainVectors, cone_angle_deg, deconvolve, optical_density

#: QuPath's colours of its intensity classes.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Negative": (90, 90, 180), "Positive": (200, 50, 50), "1+": (255, 215, 0),
    "2+": (225, 150, 50), "3+": (200, 50, 50)}
#: Name and colour of nuclei that are not scored (no DAB on the slide).
UNCLASSIFIED = ("Nucleus", (90, 90, 180))
#: Shape measurements, in QuPath's spelling (area and lengths in µm).
SHAPE_NAMES = ("Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Nucleus: Circularity",
               "Nucleus: Max caliper µm", "Nucleus: Min caliper µm", "Nucleus: Eccentricity")
#: Statistics of each stain's optical density inside a nucleus.
INTENSITY_STATS = ("mean", "sum", "std dev", "max", "min", "range")
#: Resolutions within this relative tolerance of the requested pixel size are used as they
#: are (the tile stream delivers tiles at about 0.5 µm/px already).
PIXEL_SIZE_TOLERANCE = 0.05
#: Sigma (px) of the blur of the distance map before its maxima split nuclei.
EDM_SMOOTHING = 1.0
_SQUARE = np.ones((3, 3), bool)
_CROSS = ndi.generate_binary_structure(2, 1)
_CALIPER_DIRECTIONS = np.stack([np.cos(np.linspace(0, np.pi, 180, endpoint=False)),
                                np.sin(np.linspace(0, np.pi, 180, endpoint=False))])


@dataclass(frozen=True)
class Nuclei:
    """Detected nuclei: ``centroids`` (N, 2) x, y and outlines (nucleus ``i`` has the
    vertices ``vertices[offsets[i]:offsets[i + 1]]``, a closed ring without its repeated
    first vertex), in the pixel frame of the image given (pixel ``(r, c)`` covers
    ``[c, c + 1) x [r, r + 1)``) or, after :meth:`transformed`, level-0 pixels; one row
    of ``measurements`` (N, K) float32 per nucleus, columns named by ``names``."""

    centroids: np.ndarray
    vertices: np.ndarray
    offsets: np.ndarray
    measurements: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.centroids)
        if self.centroids.shape != (n, 2) or not np.isfinite(self.centroids).all():
            raise ValueError(f"centroids must be (N, 2) finite, got {self.centroids.shape}")
        if self.offsets.shape != (n + 1,) or self.offsets.dtype != np.int64:
            raise ValueError(f"offsets must be (N + 1,) int64, got {self.offsets.dtype} "
                             f"{self.offsets.shape} for {n} nuclei")
        if n and (self.offsets[0] != 0 or (np.diff(self.offsets) < 3).any()):
            raise ValueError("offsets must start at 0 and give each outline >= 3 vertices")
        if self.vertices.shape != (int(self.offsets[-1]), 2):
            raise ValueError(f"vertices must be ({int(self.offsets[-1])}, 2), got "
                             f"{self.vertices.shape}")
        if self.measurements.shape != (n, len(self.names)):
            raise ValueError(f"measurements must be ({n}, {len(self.names)}), got "
                             f"{self.measurements.shape}")

    def __len__(self) -> int:
        return len(self.centroids)

    @classmethod
    def empty(cls, names: tuple[str, ...]) -> Nuclei:
        return cls(np.zeros((0, 2)), np.zeros((0, 2), np.float32), np.zeros(1, np.int64),
                   np.zeros((0, len(names)), np.float32), names)

    def column(self, name: str) -> np.ndarray:
        """One measurement of every nucleus; KeyError naming the measured ones."""
        if name not in self.names:
            raise KeyError(f"no measurement {name!r}; measured: {', '.join(self.names)}")
        return self.measurements[:, self.names.index(name)]

    def outline(self, i: int) -> np.ndarray:
        return self.vertices[self.offsets[i]:self.offsets[i + 1]]

    def select(self, keep: np.ndarray) -> Nuclei:
        """The nuclei where boolean ``keep`` is true, in order."""
        keep = np.asarray(keep, bool)
        sizes = np.diff(self.offsets)[keep]
        rows = np.repeat(keep, np.diff(self.offsets))
        return Nuclei(self.centroids[keep], self.vertices[rows],
                      np.r_[0, np.cumsum(sizes)].astype(np.int64), self.measurements[keep],
                      self.names)

    def transformed(self, origin: tuple[float, float], scale: float) -> Nuclei:
        """Coordinates mapped by ``p -> origin + scale * p`` (image px to level-0 px)."""
        o = np.asarray(origin, np.float64)
        return Nuclei(o + scale * self.centroids,
                      (o + scale * self.vertices.astype(np.float64)).astype(np.float32),
                      self.offsets, self.measurements, self.names)

    @classmethod
    def concat(cls, parts: list[Nuclei], names: tuple[str, ...]) -> Nuclei:
        """All nuclei of ``parts`` (each measured with ``names``), in order."""
        if any(p.names != names for p in parts):
            raise ValueError("all parts must have the same measurements")
        if not parts:
            return cls.empty(names)
        sizes = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(np.concatenate([p.centroids for p in parts]),
                   np.concatenate([p.vertices for p in parts]),
                   np.r_[0, np.cumsum(sizes)].astype(np.int64),
                   np.concatenate([p.measurements for p in parts]), names)


@dataclass(frozen=True)
class Positivity:
    """Classes of nuclei and the slide's DAB scores.

    ``labels`` index ``classes``. ``applicable`` is false on slides without DAB: every
    nucleus is then unclassified, ``reason`` says why, and the scores are None.
    ``intensity_counts`` counts Negative, 1+, 2+ and 3+ nuclei by the three thresholds
    (also in single-threshold mode, for the H-score)."""

    labels: np.ndarray
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    applicable: bool
    reason: str | None
    intensity_counts: dict[str, int] = field(default_factory=dict)
    positive_percent: float | None = None
    h_score: float | None = None

    def __post_init__(self) -> None:
        if len(self.colors) != len(self.classes):
            raise ValueError("one colour per class required")
        if len(self.labels) and (self.labels.min() < 0
                                 or self.labels.max() >= len(self.classes)):
            raise ValueError("labels must index classes")
        if self.applicable == (self.reason is not None):
            raise ValueError("a reason is given exactly when the scores are not applicable")

    @property
    def counts(self) -> dict[str, int]:
        """Nuclei per class, in class order."""
        got = np.bincount(self.labels.astype(np.int64), minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, got, strict=True)}

    @property
    def n_positive(self) -> int | None:
        if not self.applicable:
            return None
        return sum(v for k, v in self.intensity_counts.items() if k != "Negative")


def scored_stain(stains: StainVectors) -> str | None:
    """Name of the stain scored for positivity (DAB), or None when the slide has none."""
    if stains.kind != "brightfield-hdab" or "DAB" not in stains.names:
        return None
    return "DAB"


def not_applicable_reason(stains: StainVectors) -> str | None:
    """Why DAB scores do not exist on this slide, or None when they do."""
    if scored_stain(stains) is not None:
        return None
    what = {"brightfield-he": "an H&E (brightfield) slide",
            "brightfield-other": "a brightfield slide whose stains are neither H&E nor H-DAB",
            "fluorescence": "a fluorescence slide",
            "brightfield-hdab": "an H-DAB slide without a stain named DAB"}[stains.kind]
    return (f"not applicable: this is {what} (stain vectors: {stains.source}); Positive % "
            "and H-score exist only on H-DAB (brightfield IHC) slides")


def measured_stains(stains: StainVectors) -> tuple[str, ...]:
    """Stains whose optical density is measured in each nucleus (the residual is not)."""
    return tuple(n for n in stains.names if not n.lower().startswith("residual"))


def measurement_names(stains: StainVectors) -> tuple[str, ...]:
    """Every measurement :func:`detect_nuclei` gives with these stains, in column order."""
    return SHAPE_NAMES + tuple(f"Nucleus: {s} OD {stat}" for s in measured_stains(stains)
                               for stat in INTENSITY_STATS)


Box = tuple[float, float, float, float]


def detect_nuclei(rgb: np.ndarray, mpp: float, stains: StainVectors,
                  params: NucleiParams = NucleiParams(),
                  core: Box | np.ndarray | None = None, valid: Box | None = None) -> Nuclei:
    """Nuclei of uint8 RGB ``rgb`` (H, W, 3) whose pixels are ``mpp`` µm wide.

    The image is analysed at ``requestedPixelSizeMicrons`` (box-resized when it is finer
    by more than 5%; never upsampled). With ``core`` (x0, y0, x1, y1 in image px, or an
    array of such boxes) only nuclei whose centroid lies in ``[x0, x1) x [y0, y1)`` (of
    some box) are kept, and none touching the image border (a halo around the core holds
    the rest of those): this is how a tile with a halo is analysed. With ``valid`` (a box likewise), nuclei are cut off outside
    it (the image beyond it only fills the filters' edges, as past a slide's edge).
    Coordinates are in the pixel frame of ``rgb``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp!r}")
    if stains.kind == "fluorescence":
        raise ValueError("nucleus detection on optical density needs a brightfield image; "
                         "this one is fluorescence")
    names = measurement_names(stains)
    img, scale = _at_pixel_size(rgb[..., :3], mpp, params.requestedPixelSizeMicrons)
    px = mpp * scale  # µm per analysed pixel
    dens = deconvolve(img, stains)
    channels = [dens[..., stains.names.index(s)] for s in measured_stains(stains)]
    if detection_image(stains, params) == "Optical density sum":
        det = optical_density(img, stains.background).sum(axis=-1)
    else:
        det = dens[..., _hematoxylin_index(stains)].copy()
    dab = dens[..., stains.names.index("DAB")] if "DAB" in stains.names else None
    inside = None if valid is None else tuple(int(round(v / scale)) for v in valid)
    labels, _ = segment(det, px, params, dens[..., _hematoxylin_index(stains)], dab,
                        inside)
    labels = reject_stroma_and_ink(labels, img, dens, stains, params, px)
    return measured_nuclei(labels, channels, names, px, scale, params, core)


def measured_nuclei(labels: np.ndarray, channels: list[np.ndarray], names: tuple[str, ...],
                    px: float, scale: float, params: NucleiParams,
                    core: Box | np.ndarray | None) -> Nuclei:
    """:class:`Nuclei` of ``labels`` (analysed pixels ``px`` µm, image px per analysed
    px ``scale``): those whose centroid is in ``core`` (none touching the
    border) when given, outlined, solid enough, measured on ``channels``."""
    ids = np.arange(1, int(labels.max()) + 1)
    if not len(ids):
        return Nuclei.empty(names)
    cy, cx = (np.asarray(c) + 0.5 for c in
              zip(*ndi.center_of_mass(np.ones_like(labels), labels, ids)))
    centroids = np.stack([cx, cy], axis=1)
    keep = np.ones(len(ids), bool) if core is None else _in_core(labels, centroids, core,
                                                                 scale)
    ids, centroids = ids[keep], centroids[keep]
    if not len(ids):
        return Nuclei.empty(names)
    rings = outlines(labels, ids, params.smoothBoundaries)
    if params.minSolidity > 0:
        solid = solidity(rings) >= params.minSolidity
        ids, centroids = ids[solid], centroids[solid]
        rings = [r for r, ok in zip(rings, solid, strict=True) if ok]
        if not len(ids):
            return Nuclei.empty(names)
    table = np.concatenate([shape_measurements(rings, labels, ids, px),
                            intensity_measurements(channels, labels, ids)], axis=1)
    sizes = np.array([len(r) for r in rings], np.int64)
    return Nuclei(centroids * scale,
                  np.concatenate(rings).astype(np.float32) * np.float32(scale),
                  np.r_[0, np.cumsum(sizes)].astype(np.int64), table.astype(np.float32),
                  names)


def _in_core(labels: np.ndarray, centroids: np.ndarray, core: Box | np.ndarray,
             scale: float) -> np.ndarray:
    boxes = np.asarray(core, np.float64).reshape(-1, 4)[:, None, :] / scale
    cx, cy = centroids[None, :, 0], centroids[None, :, 1]
    keep = np.asarray(((cx >= boxes[..., 0]) & (cx < boxes[..., 2])
                       & (cy >= boxes[..., 1]) & (cy < boxes[..., 3])).any(axis=0))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep[edge[edge > 0] - 1] = False
    return keep


def nuclear_stains(stains: StainVectors) -> tuple[int, ...]:
    """Indices of the stains that mark nuclei: haematoxylin, and DAB on H-DAB slides
    (a Ki-67 or ER nucleus may hold more DAB than haematoxylin)."""
    idx = [_hematoxylin_index(stains)]
    if scored_stain(stains) is not None:
        idx.append(stains.names.index("DAB"))
    return tuple(idx)


def rejects_stroma_and_ink(stains: StainVectors) -> bool:
    """Whether :func:`reject_stroma_and_ink` applies: on brightfield slides other than
    H-DAB. IHC counterstains haematoxylin lightly (so that DAB shows): its nuclei stand
    out from their surroundings by a few hundredths of OD, which no contrast rule can
    tell from stroma, and DAB-positive nuclei are not haematoxylin-coloured."""
    return stains.kind in ("brightfield-he", "brightfield-other")


def reject_stroma_and_ink(labels: np.ndarray, img: np.ndarray, dens: np.ndarray,
                          stains: StainVectors, params: NucleiParams, px: float
                          ) -> np.ndarray:
    """``labels`` without the objects that are not nuclei (relabelled 1..n):

    - ``minNucleusContrast``: a nucleus is darker in haematoxylin than what
      surrounds it; the mean nuclear-stain OD (:func:`nuclear_stains`) inside must exceed
      that of the ring ``contrastRingMicrons`` wide around it (other nuclei left out) by
      at least this much. Stroma between collagen fibres, which the Laplacian outlines
      where it is a little bluer than the fibres, holds about as much as its ring.
    - ``maxStainAngle``: the nucleus's mean OD vector must lie within this many degrees of
      some non-negative mix of the slide's two stains: marking ink, pigment and dust have
      colours no amount of haematoxylin and eosin gives.

    Only on the kinds of :func:`rejects_stroma_and_ink`; elsewhere ``labels`` as given.
    """
    n = int(labels.max())
    if (not n or not rejects_stroma_and_ink(stains)
            or (params.minNucleusContrast <= 0 and params.maxStainAngle <= 0)):
        return labels
    good = np.ones(n, bool)
    if params.minNucleusContrast > 0:
        nuclear = dens[..., list(nuclear_stains(stains))].sum(axis=-1)
        good &= nucleus_contrast(labels, nuclear, params.contrastRingMicrons / px
                                 ) >= params.minNucleusContrast
    if params.maxStainAngle > 0:
        od = optical_density(img, stains.background)
        mean_od = np.stack([_label_means(od[..., k], labels, n) for k in range(3)], axis=1)
        m = np.asarray(stains.matrix, np.float64)
        angle = cone_angle_deg(mean_od, tuple(m[0]), tuple(m[1]))
        good &= angle <= params.maxStainAngle
    if good.all():
        return labels
    relabel = np.zeros(n + 1, np.int32)
    relabel[1:][good] = np.arange(1, int(good.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def nucleus_contrast(labels: np.ndarray, image: np.ndarray, ring_px: float) -> np.ndarray:
    """Per label 1..n: mean of ``image`` inside minus its mean over the ring of pixels
    within ``ring_px`` of the label that belong to no label (NaN-free: a label without
    ring pixels gets its inside mean)."""
    n = int(labels.max())
    grown = rank_filter(labels, max(ring_px, 1.0), "max")
    ring = np.where(labels == 0, grown, 0)
    inside = _label_means(image, labels, n)
    around = _label_means(image, ring, n)
    return np.asarray(inside - np.nan_to_num(around, nan=0.0))


def solidity(rings: list[np.ndarray]) -> np.ndarray:
    """Area of each outline over the area of its convex hull (1 for a convex one)."""
    import shapely

    closed = np.concatenate([np.vstack([r, r[:1]]) for r in rings]).astype(np.float64)
    which = np.repeat(np.arange(len(rings)), [len(r) + 1 for r in rings])
    polys = shapely.polygons(shapely.linearrings(closed, indices=which))
    hull = shapely.area(shapely.convex_hull(polys))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hull > 0, shapely.area(polys) / hull, 0.0)


def detection_image(stains: StainVectors, params: NucleiParams) -> str:
    """The image nuclei are found on: as set, or for ``auto`` the optical-density sum on
    H-DAB slides (dark DAB-positive nuclei hold little haematoxylin) and the deconvolved
    haematoxylin elsewhere (on H&E the sum would take eosin-stained stroma for nuclei)."""
    if params.detectionImageBrightfield != "auto":
        return params.detectionImageBrightfield
    return "Optical density sum" if stains.kind == "brightfield-hdab" else "Hematoxylin OD"


def _hematoxylin_index(stains: StainVectors) -> int:
    for i, n in enumerate(stains.names):
        if n.lower().startswith(("hematoxylin", "haematoxylin")):
            return i
    return 0


def _at_pixel_size(rgb: np.ndarray, mpp: float, requested: float) -> tuple[np.ndarray, float]:
    """``rgb`` at ``requested`` µm/px (box filter) unless within tolerance or coarser;
    and its scale: image px of ``rgb`` per returned pixel."""
    if mpp >= requested * (1 - PIXEL_SIZE_TOLERANCE):
        return rgb, 1.0
    from PIL import Image

    h, w = rgb.shape[:2]
    f = requested / mpp
    size = (max(1, round(w / f)), max(1, round(h / f)))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
        size, Image.Resampling.BOX))
    return out, w / size[0]


def segment(det: np.ndarray, px: float, params: NucleiParams,
            hematoxylin: np.ndarray | None = None, dab: np.ndarray | None = None,
            inside: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus labels (int32, 0 = none) of detection image ``det`` (pixels ``px`` µm
    wide), and the image their intensity checks are made on (background subtracted).
    ``inside``: x0, y0, x1, y1 of the region nuclei may occupy (all of ``det`` if None)."""
    det = np.asarray(det, np.float32)
    sigma = params.sigmaMicrons / px
    work = det
    if params.medianRadiusMicrons > 0:
        work = ndi.median_filter(det, footprint=circle(params.medianRadiusMicrons / px))
    if params.excludeDAB and hematoxylin is not None and dab is not None:
        keep = (hematoxylin >= dab).astype(np.uint8)
        keep = rank_filter(ndi.median_filter(keep, footprint=circle(2.5)), 2.5, "max")
        work = work * keep
    bad = None
    if params.backgroundRadiusMicrons > 0:
        background, bad = estimate_background(work, params.backgroundRadiusMicrons / px,
                                              params.maxBackground,
                                              params.backgroundByReconstruction)
        work = work - background
        measure = work
    else:
        measure = det
    log = laplacian_of_gaussian(work, sigma)
    positive = log > 0
    candidates = _candidates(log, positive)
    n = int(candidates.max())
    ok = np.zeros(n + 1, bool)
    if n:
        ok[1:] = _label_means(measure, candidates, n) > params.threshold
        if bad is not None:
            ok[1:] &= np.bincount(candidates.ravel(), bad.ravel(), minlength=n + 1)[1:] == 0
    mask = ndi.binary_dilation(ok[candidates], _SQUARE) & positive  # merge kept neighbours
    if params.watershedPostProcess:
        mask = split_by_shape(fill_holes(ndi.label(mask)[0]) > 0)
    if inside is not None:
        x0, y0, x1, y1 = inside
        clipped = np.zeros_like(mask)
        clipped[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
        mask = clipped
    if sigma > 1.5:  # Gaussian smoothing moves thin nuclei's boundaries out by a pixel
        fine = laplacian_of_gaussian(det, 1.0) > 0
        mask = ndi.binary_erosion(mask, _SQUARE, border_value=1) | (fine & mask)
    labels = fill_holes(ndi.label(mask)[0])
    n = int(labels.max())
    if not n:
        return labels.astype(np.int32), measure
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    mean = _label_means(measure, labels, n)
    good = ((mean >= params.threshold) & (area >= params.minAreaMicrons / px**2)
            & (area <= params.maxAreaMicrons / px**2))
    relabel = np.zeros(n + 1, np.int32)
    relabel[1:][good] = np.arange(1, int(good.sum()) + 1, dtype=np.int32)
    return relabel[labels], measure


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """``labels`` (4-connected objects) with each object's holes filled: background
    regions enclosed by that object alone (a gap between two objects stays a gap)."""
    filled = ndi.binary_fill_holes(labels > 0)
    holes, n = ndi.label(filled & (labels == 0))
    if not n:
        return labels
    groups = LabelGroups(holes, np.arange(1, n + 1))
    big = np.iinfo(labels.dtype).max
    hi = groups.max(groups.values(ndi.maximum_filter(labels, footprint=_CROSS)))
    lo = groups.min(groups.values(ndi.minimum_filter(np.where(labels > 0, labels, big),
                                                     footprint=_CROSS)))
    fill = np.zeros(n + 1, labels.dtype)
    fill[1:] = np.where(hi == lo, hi, 0)
    return np.where(labels > 0, labels, fill[holes])


def _label_means(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``image`` over each of labels 1..n (NaN for an absent one)."""
    lab = labels.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(lab, image.ravel().astype(np.float64), minlength=n + 1)[1:]
                / np.bincount(lab, minlength=n + 1)[1:])


def _candidates(log: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Watershed of the LoG from its regional maxima, over its positive pixels, with
    one-pixel lines between basins."""
    from skimage.morphology import local_maxima
    from skimage.segmentation import watershed

    seeds = local_maxima(log, connectivity=2, allow_borders=False) & (log >= 1e-3)
    markers, n = ndi.label(seeds)
    if not n:
        return markers
    return np.asarray(watershed(-log, markers, mask=positive, connectivity=1,
                                watershed_line=True))


def split_by_shape(mask: np.ndarray) -> np.ndarray:
    """Touching round objects split along the watershed of their distance transform,
    from its maxima at least half a pixel high (ImageJ's binary watershed). Each object
    is flooded on its own, so it splits the same way whatever else the image holds."""
    if not mask.any():
        return mask
    # the distance map of a pixel grid has false ridges (a diagonal nucleus alternates
    # 2, 2.83, 2, ...): a light blur removes them, as ImageJ's "true EDM height" does
    edm = ndi.gaussian_filter(ndi.distance_transform_edt(mask), EDM_SMOOTHING) * mask
    peaks = h_maxima_by_object(edm, mask)
    objects, n = ndi.label(mask)
    _, first = np.unique(ndi.label(peaks)[0], return_index=True)
    n_peaks = np.bincount(objects.ravel()[first[1:]], minlength=n + 1)
    out = mask.copy()
    slices = ndi.find_objects(objects)
    for i in np.flatnonzero(n_peaks >= 2):
        sl = slices[i - 1]
        assert sl is not None
        obj = objects[sl] == i
        markers, _ = ndi.label(peaks[sl] & obj)
        split = watershed_lines(-edm[sl], markers, obj) > 0
        out[sl] &= split | ~obj
    return out


def laplacian_of_gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur, then the negated 4-neighbour Laplacian (bright blobs > 0)."""
    blurred = ndi.gaussian_filter(np.asarray(img, np.float32), sigma, mode="nearest")
    return np.asarray(-ndi.laplace(blurred, mode="nearest"))


def estimate_background(img: np.ndarray, radius: float, max_background: float,
                        by_reconstruction: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Background of ``img``: its circular minimum filter, reconstructed by dilation under
    it (or dilated back: a plain opening); and where it is above ``max_background``
    (grown by twice the radius), the mask of pixels whose nuclei are discarded."""
    seed = rank_filter(img, radius, "min")
    bad = None
    if max_background > 0 and (seed > max_background).any():
        bad = rank_filter((seed > max_background).astype(np.uint8), 2 * radius, "max") > 0
        seed[bad] = img.min()
    if by_reconstruction:
        return np.asarray(reconstruct_by_dilation(seed, img), np.float32), bad
    return rank_filter(seed, radius, "max"), bad


def circle(radius: float) -> np.ndarray:
    """ImageJ's circular kernel of ``radius`` px: ``dx^2 + dy^2 <= floor(r^2) + 1``."""
    r2 = int(radius * radius) + 1
    k = int(math.sqrt(r2 + 1e-10))
    y, x = np.mgrid[-k:k + 1, -k:k + 1]
    return np.asarray(x * x + y * y <= r2)


def rank_filter(img: np.ndarray, radius: float, op: str) -> np.ndarray:
    """Minimum or maximum over ImageJ's circle of ``radius`` px, edges replicated: one
    running (van Herk) filter per chord width, then one pass per kernel row."""
    reduce = np.minimum if op == "min" else np.maximum
    run = ndi.minimum_filter1d if op == "min" else ndi.maximum_filter1d
    kernel = circle(radius)
    k = kernel.shape[0] // 2
    half = kernel.sum(axis=1) // 2  # half chord width of each kernel row
    rows = {int(w): run(img, 2 * int(w) + 1, axis=1, mode="nearest") for w in set(half)}
    out = None
    for dy in range(-k, k + 1):
        src = rows[int(half[dy + k])]
        idx = np.clip(np.arange(img.shape[0]) + dy, 0, img.shape[0] - 1)
        out = src[idx] if out is None else reduce(out, src[idx])
    assert out is not None
    return out


def outlines(labels: np.ndarray, ids: np.ndarray, smooth: bool) -> list[np.ndarray]:
    """One closed outline (V, 2) x, y per label in ``ids`` (holes filled), through the
    edges of its boundary pixels; smoothed by a 3-vertex moving average when ``smooth``;
    near-collinear vertices dropped."""
    import shapely

    rings = _traced(labels, ids)
    xy, prev, nxt = _ring_arrays(rings)
    if smooth:
        xy = (xy[prev] + xy + xy[nxt]) / 3
    which = np.repeat(np.arange(len(rings)), [len(r) + 1 for r in rings])
    closed = np.insert(xy, np.cumsum([len(r) for r in rings]), xy[_firsts(rings)], axis=0)
    polys = shapely.simplify(shapely.polygons(shapely.linearrings(closed, indices=which)),
                             0.2, preserve_topology=False)
    ok = shapely.is_valid(polys) & (shapely.get_num_coordinates(polys) >= 4)
    coords, where = shapely.get_coordinates(shapely.get_exterior_ring(polys),
                                            return_index=True)
    parts = np.split(coords, np.searchsorted(where, np.arange(1, len(rings))))
    sizes = np.cumsum([len(r) for r in rings])[:-1]
    plain = np.split(xy, sizes)
    return [p[:-1] if good else r for p, r, good in zip(parts, plain, ok, strict=True)]


def _traced(labels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """The outer boundary (V, 2) x, y of each label in ``ids``, in that order: marching
    squares over all of them at once, diagonal neighbours kept apart (4-connected
    objects), each boundary given to the label on its inner side."""
    from skimage.measure import find_contours

    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[ids] = True
    lab = np.pad(np.where(keep[labels], labels, 0), 1)
    best: dict[int, np.ndarray] = {}
    for c in find_contours((lab > 0).astype(np.float32), 0.5, fully_connected="low"):
        y, x = c[:-1, 0], c[:-1, 1]
        if len(y) < 3 or np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) <= 0:
            continue  # a hole between objects, not an object's outline
        r, q = c[0]
        if r == int(r):  # on a horizontal pixel step: the pixels left and right of it
            pair = lab[int(r), int(np.floor(q))], lab[int(r), int(np.ceil(q))]
        else:
            pair = lab[int(np.floor(r)), int(q)], lab[int(np.ceil(r)), int(q)]
        i = int(max(pair))
        if i and len(c) - 1 > len(best.get(i, ())):
            best[i] = np.stack([x, y], axis=1) - 0.5  # unpadded, pixel centres at +0.5
    return [best[int(i)] for i in ids]


def _firsts(rings: list[np.ndarray]) -> np.ndarray:
    return np.r_[0, np.cumsum([len(r) for r in rings])[:-1]].astype(np.int64)


def _ring_arrays(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All vertices of ``rings`` in one array, and for each vertex the index of the
    previous and the next vertex of its own ring."""
    sizes = np.array([len(r) for r in rings], np.int64)
    start = np.repeat(_firsts(rings), sizes)
    size = np.repeat(sizes, sizes)
    k = np.arange(int(sizes.sum())) - start
    return (np.concatenate(rings).astype(np.float64), start + (k - 1) % size,
            start + (k + 1) % size)


def shape_measurements(rings: list[np.ndarray], labels: np.ndarray, ids: np.ndarray,
                       px: float) -> np.ndarray:
    """Area, perimeter, circularity, max and min caliper of each outline (µm) and the
    eccentricity of each label's pixels (moments), as columns of :data:`SHAPE_NAMES`."""
    xy, _, nxt = _ring_arrays(rings)
    starts = _firsts(rings)
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    area = 0.5 * np.abs(np.add.reduceat(cross, starts))
    perim = np.add.reduceat(np.hypot(*(xy[nxt] - xy).T), starts)
    proj = (xy @ _CALIPER_DIRECTIONS).astype(np.float32)
    widths = np.maximum.reduceat(proj, starts) - np.minimum.reduceat(proj, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        circ = np.where(perim > 0, np.minimum(4 * math.pi * area / perim**2, 1.0), 0.0)
    return np.stack([area * px**2, perim * px, circ, widths.max(axis=1) * px,
                     widths.min(axis=1) * px, eccentricity(labels, ids)], axis=1)


def eccentricity(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """sqrt(1 - minor/major) of the eigenvalues of each label's second moments (the
    eccentricity of its best-fitting ellipse)."""
    yx = np.indices(labels.shape, dtype=np.float64)
    y, x = yx[0], yx[1]
    lab = labels.ravel()
    n = int(labels.max()) + 1

    def total(w: np.ndarray | None) -> np.ndarray:
        return np.bincount(lab, None if w is None else w.ravel(), minlength=n)[ids]

    cnt = total(None)
    mx, my = total(x) / cnt, total(y) / cnt
    sxx, syy, sxy = (total(x * x) / cnt - mx**2, total(y * y) / cnt - my**2,
                     total(x * y) / cnt - mx * my)
    common = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    major, minor = (sxx + syy) / 2 + common, (sxx + syy) / 2 - common
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.sqrt(np.clip(1 - minor / major, 0, 1))
    return np.where(major > 0, e, 0.0)


def intensity_measurements(channels: list[np.ndarray], labels: np.ndarray, ids: np.ndarray
                           ) -> np.ndarray:
    """Per channel: mean, sum, std dev (n - 1), max, min and range inside each label."""
    groups = LabelGroups(labels, ids)
    cols = []
    for ch in channels:
        v = groups.values(ch)
        s = groups.sum(v)
        ss = groups.sum(v * v)
        cnt = groups.count
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(cnt > 1, (ss - s * s / cnt) / (cnt - 1), np.nan)
        hi, lo = groups.max(v), groups.min(v)
        cols += [s / cnt, s, np.sqrt(np.maximum(var, 0)), hi, lo, hi - lo]
    return np.stack(cols, axis=1) if cols else np.zeros((len(ids), 0))


class LabelGroups:
    """The pixels of labels ``ids`` (ascending, each present), sorted by label once, for
    per-label sums, minima and maxima of any image (``reduceat``, not a sort per call)."""

    def __init__(self, labels: np.ndarray, ids: np.ndarray) -> None:
        lab = labels.ravel()
        want = np.zeros(int(labels.max()) + 1, bool)
        want[ids] = True
        pix = np.flatnonzero(want[lab])
        order = np.argsort(lab[pix], kind="stable")
        self.pixels = pix[order]
        sorted_labels = lab[self.pixels]
        self.starts = np.searchsorted(sorted_labels, ids)
        self.count = np.diff(np.r_[self.starts, len(sorted_labels)]).astype(np.float64)

    def values(self, image: np.ndarray) -> np.ndarray:
        return image.ravel()[self.pixels].astype(np.float64)

    def sum(self, v: np.ndarray) -> np.ndarray:
        return np.add.reduceat(v, self.starts) if len(v) else np.zeros(len(self.starts))

    def max(self, v: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(v, self.starts)

    def min(self, v: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(v, self.starts)


def score_positivity(nuclei: Nuclei, stains: StainVectors,
                     params: NucleiParams = NucleiParams()) -> Positivity:
    """Classes and DAB scores of ``nuclei`` by ``params.thresholdCompartment``: QuPath's
    Positive/Negative (``singleThreshold``) or Negative/1+/2+/3+ classes; Positive % and
    H-score (1 x %1+ + 2 x %2+ + 3 x %3+). Not applicable without DAB."""
    reason = not_applicable_reason(stains)
    n = len(nuclei)
    if reason is not None:
        return Positivity(np.zeros(n, np.int16), (UNCLASSIFIED[0],), (UNCLASSIFIED[1],),
                          False, reason)
    v = nuclei.column(params.thresholdCompartment).astype(np.float64)
    t1, t2, t3 = params.thresholdPositive1, params.thresholdPositive2, params.thresholdPositive3
    tier = np.where(v >= t3, 3, np.where(v >= t2, 2, np.where(v >= t1, 1, 0)))
    if params.singleThreshold:
        tier = np.where(v >= t1, np.maximum(tier, 1), 0)
    tiers = ("Negative", "1+", "2+", "3+")
    counts = {name: int(k) for name, k in zip(tiers, np.bincount(tier, minlength=4),
                                              strict=True)}
    pct = {k: 100.0 * c / n for k, c in counts.items()} if n else {}
    if params.singleThreshold:
        classes: tuple[str, ...] = ("Negative", "Positive")
        labels = (tier > 0).astype(np.int16)
    else:
        classes, labels = tiers, tier.astype(np.int16)
    return Positivity(labels, classes, tuple(CLASS_COLORS[c] for c in classes), True, None,
                      intensity_counts=counts,
                      positive_percent=100.0 * (n - counts["Negative"]) / n if n else None,
                      h_score=(pct["1+"] + 2 * pct["2+"] + 3 * pct["3+"]) if n else None)


#: Fewest nuclei a density must rest on before :func:`density_warning` judges it.
MIN_NUCLEI_FOR_DENSITY = 50


def density_warning(n: int, area_mm2: float, params: NucleiParams) -> str | None:
    """A warning that the mpp may be wrong when ``n`` nuclei on ``area_mm2`` lie outside
    ``minPlausibleDensity`` .. ``maxPlausibleDensity`` per mm^2; None inside it, or with
    fewer than :data:`MIN_NUCLEI_FOR_DENSITY` nuclei or no area. A mpp 4x too small
    makes the area 16x too small; the upper end (60,000/mm^2) is about a section packed
    solid with nuclei 4.5 µm across, which no tissue reaches."""
    if n < MIN_NUCLEI_FOR_DENSITY or not area_mm2 > 0:
        return None
    density = n / area_mm2
    lo, hi = params.minPlausibleDensity, params.maxPlausibleDensity
    if lo <= density <= hi:
        return None
    return (f"the mpp may be wrong: {density:,.0f} nuclei/mm^2 is outside the plausible "
            f"{lo:,.0f}-{hi:,.0f}; check the slide's mpp (or give --mpp)")


def summary(nuclei: Nuclei, positivity: Positivity, area_mm2: float) -> dict[str, Any]:
    """Slide-level numbers: counts, density, median nucleus area and the DAB scores."""
    n = len(nuclei)
    areas = nuclei.column(SHAPE_NAMES[0]) if n else np.zeros(0)
    return {"n_cells": n, "n_positive": positivity.n_positive,
            "positive_percent": positivity.positive_percent, "h_score": positivity.h_score,
            "intensity_counts": positivity.intensity_counts or None,
            "area_mm2": area_mm2,
            "density_per_mm2": n / area_mm2 if area_mm2 > 0 else None,
            "median_nucleus_area_um2": float(np.median(areas)) if n else None,
            "dab": "scored" if positivity.applicable else positivity.reason}
