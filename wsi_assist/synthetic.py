"""Synthetic H&E-like pyramidal slides with a known answer, for the demo, tests and benchmarks.

Tissue is a set of pink ellipses on white glass, sprinkled with purple nuclei on a jittered
lattice. Pixels are computed block by block, so a 40,000 px slide is written without
holding it in memory. Every file is labelled ``wsi-assist synthetic`` in its description.

:func:`he_slide` sizes the nuclei in um (radius NUCLEUS_RADIUS_UM, spacing
NUCLEUS_SPACING_UM), so the tissue looks alike at any level-0 pixel size; the pixel
defaults of :class:`SyntheticSlide` (6 and 24 px) are those sizes at 0.5 um/px only.
:func:`write_large` writes a big slide quickly (a 40,000 px slide in seconds, not the
minutes of :func:`write_slide`): each level's tiles wholly in tissue repeat a few
rendered ones, tiles of bare glass one, and only tiles crossing a tissue edge are
rendered where they lie, so the slide is tissue-sized ellipses at every level, each level
a true downsample of the same drawing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

SlideKind = Literal["svs", "tiff", "tiff-no-mpp", "tiff-72dpi", "ome"]
MARKER = "wsi-assist synthetic"
PINK = np.array([236, 160, 196], np.float32)
PURPLE = np.array([92, 52, 138], np.float32)
WHITE = np.array([244, 244, 246], np.float32)
#: Nuclei of :func:`he_slide`: radius and lattice spacing in um (6 and 24 px at 0.5 um/px).
NUCLEUS_RADIUS_UM = 3.0
NUCLEUS_SPACING_UM = 12.0
#: Distinct tiles wholly in tissue that :func:`write_large` renders per level.
INTERIOR_VARIANTS = 8


class _TileOpts(TypedDict):
    """Keyword arguments of ``TiffWriter.write`` shared by every tiled level."""

    tile: tuple[int, int]
    compression: str
    compressionargs: dict[str, Any]
    photometric: str


class _Resolution(TypedDict, total=False):
    """``TiffWriter.write`` resolution tags; absent for slides without a pixel size."""

    resolution: tuple[float, float]
    resolutionunit: str


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse of tissue in level-0 px."""

    cx: float
    cy: float
    rx: float
    ry: float

    @property
    def area(self) -> float:
        return float(np.pi * self.rx * self.ry)


@dataclass(frozen=True)
class SyntheticSlide:
    """What to draw: size, tissue ellipses and nuclei (radius and lattice spacing, level-0 px)."""

    width: int
    height: int
    ellipses: tuple[Ellipse, ...] = ()
    nucleus_radius: float = 6.0
    nucleus_spacing: float = 24.0
    seed: int = 0
    blank: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"size must be positive, got {self.width} x {self.height}")

    @property
    def tissue_area(self) -> float:
        """Drawn tissue area in level-0 px^2 (the ellipses do not overlap)."""
        return 0.0 if self.blank else sum(e.area for e in self.ellipses)

    def tissue_mask(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether level-0 points (broadcast ``xs`` x ``ys``) lie in tissue."""
        inside = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
        if self.blank:
            return inside
        for e in self.ellipses:
            inside |= ((xs - e.cx) / e.rx) ** 2 + ((ys - e.cy) / e.ry) ** 2 <= 1.0
        return inside

    def nuclei(self) -> np.ndarray:
        """Level-0 (x, y) centres of all nuclei drawn (those whose centre is in tissue)."""
        s = self.nucleus_spacing
        gx, gy = np.meshgrid(np.arange(self.width // s + 1), np.arange(self.height // s + 1))
        cx, cy = self._centres(gx.ravel(), gy.ravel())
        keep = self.tissue_mask(cx, cy) & (cx < self.width) & (cy < self.height)
        return np.stack([cx[keep], cy[keep]], axis=1)

    def _centres(self, ix: np.ndarray, iy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        jx = _hash01(ix, iy, self.seed) - 0.5
        jy = _hash01(iy, ix, self.seed + 1) - 0.5
        s = self.nucleus_spacing
        return (ix + 0.5 + 0.5 * jx) * s, (iy + 0.5 + 0.5 * jy) * s

    def render(self, x0: float, y0: float, w: int, h: int, scale: float = 1.0,
               scale_y: float | None = None) -> np.ndarray:
        """RGB uint8 block of ``h`` x ``w`` px whose pixels are ``scale`` level-0 px wide."""
        xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * scale
        ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * (scale_y or scale)
        X, Y = xs[None, :], ys[:, None]
        tissue = self.tissue_mask(X, Y)
        img = np.broadcast_to(WHITE, (h, w, 3)).copy()
        if tissue.any():
            s = self.nucleus_spacing
            ix, iy = np.floor(X / s), np.floor(Y / s)
            nucleus = np.zeros((h, w), bool)
            for dx in (-1, 0, 1):  # nearest lattice cells, jitter can move a centre over
                for dy in (-1, 0, 1):
                    cx, cy = self._centres(ix + dx, iy + dy)
                    d2 = (X - cx) ** 2 + (Y - cy) ** 2
                    nucleus |= (d2 <= self.nucleus_radius**2) & self.tissue_mask(cx, cy)
            noise = (_hash01(np.floor(X), np.floor(Y), self.seed + 7) - 0.5) * 16
            pink = PINK + noise[..., None]
            img[tissue] = pink[tissue]
            img[tissue & nucleus] = (PURPLE + noise[..., None])[tissue & nucleus]
        return np.clip(img, 0, 255).astype(np.uint8)


def default_slide(width: int = 4096, height: int = 3072, seed: int = 0) -> SyntheticSlide:
    """Three non-overlapping tissue ellipses filling part of the slide."""
    e = (Ellipse(0.28 * width, 0.45 * height, 0.18 * width, 0.30 * height),
         Ellipse(0.70 * width, 0.35 * height, 0.16 * width, 0.20 * height),
         Ellipse(0.68 * width, 0.78 * height, 0.12 * width, 0.12 * height))
    return SyntheticSlide(width, height, e, seed=seed)


def he_slide(width: int, height: int, mpp: float, seed: int = 0) -> SyntheticSlide:
    """:func:`default_slide` with nuclei sized in um for a level-0 pixel size ``mpp``."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    base = default_slide(width, height, seed)
    return SyntheticSlide(width, height, base.ellipses, nucleus_radius=NUCLEUS_RADIUS_UM / mpp,
                          nucleus_spacing=NUCLEUS_SPACING_UM / mpp, seed=seed)


def write_slide(path: Path, spec: SyntheticSlide, kind: SlideKind = "svs", mpp: float = 0.5,
                level_sizes: list[tuple[int, int]] | None = None, tile: int = 256,
                quality: int = 90) -> Path:
    """Write ``spec`` as a tiled, JPEG-compressed pyramidal TIFF of the given ``kind``.

    ``level_sizes`` are the (width, height) of levels below level 0; by default the
    pyramid shrinks by factors of 4 down to about 512 px.
    """
    import tifffile

    path = Path(path)
    sizes = [(spec.width, spec.height)] + (
        level_sizes if level_sizes is not None else _default_levels(spec.width, spec.height))
    opts: _TileOpts = {"tile": (tile, tile), "compression": "jpeg",
                       "compressionargs": {"level": quality}, "photometric": "rgb"}
    px_per_cm = 1e4 / mpp
    big = spec.width * spec.height > 2**31
    with tifffile.TiffWriter(path, bigtiff=big, ome=kind == "ome") as tw:
        if kind == "svs":
            desc = (f"Aperio Image Library v12.0.15\r\n{spec.width}x{spec.height} "
                    f"[0,0 {spec.width}x{spec.height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                    f"|AppMag = {round(10 / mpp)}|MPP = {mpp}|Title = {MARKER}")
            tw.write(_tiles(spec, sizes[0], tile), shape=(*sizes[0][::-1], 3), dtype=np.uint8,
                     description=desc, metadata=None, **opts)
            thumb_w = 256
            thumb_h = max(1, round(spec.height * thumb_w / spec.width))
            tw.write(spec.render(0, 0, thumb_w, thumb_h, spec.width / thumb_w),
                     description=f"Aperio Image Library v12.0.15\r\n{thumb_w}x{thumb_h}",
                     photometric="rgb", metadata=None)
            for w, h in sizes[1:]:
                tw.write(_tiles(spec, (w, h), tile), shape=(h, w, 3), dtype=np.uint8,
                         description="Aperio Image Library v12.0.15", metadata=None, **opts)
            return path
        res: _Resolution = {}
        if kind in ("tiff", "ome"):
            res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
        elif kind == "tiff-72dpi":
            res = {"resolution": (72, 72), "resolutionunit": "INCH"}
        meta = ({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                 "PhysicalSizeYUnit": "µm", "Description": MARKER} if kind == "ome" else None)
        level0_desc = None if kind == "ome" else f"{MARKER} H&E-like slide"
        tw.write(_tiles(spec, sizes[0], tile), shape=(*sizes[0][::-1], 3), dtype=np.uint8,
                 subifds=len(sizes) - 1, description=level0_desc, metadata=meta, **res, **opts)
        for w, h in sizes[1:]:
            tw.write(_tiles(spec, (w, h), tile), shape=(h, w, 3), dtype=np.uint8,
                     subfiletype=1, metadata=None, **opts)
    return path


def _default_levels(width: int, height: int) -> list[tuple[int, int]]:
    out = []
    w, h = width // 4, height // 4
    while max(w, h) >= 512:
        out.append((w, h))
        w, h = w // 4, h // 4
    return out


def _tiles(spec: SyntheticSlide, size: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    w, h = size
    sx, sy = spec.width / w, spec.height / h
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            yield spec.render(tx * sx, ty * sy, tile, tile, sx, sy)


def write_large(path: Path, spec: SyntheticSlide, mpp: float, tile: int = 256,
                quality: int = 90) -> Path:
    """Write ``spec`` fast as an Aperio-style JPEG pyramid (levels /4 down to about
    1,000 px, a thumbnail after level 0) at ``mpp`` um/px.

    Per level, tiles are classed by the drawing's tissue at a 9 x 9 grid of points over
    each tile: crossing an edge (rendered where they lie), wholly in tissue (one of
    INTERIOR_VARIANTS rendered ones, by position) or glass (one rendered tile). The
    JPEG bytes of the distinct tiles are encoded once and repeated."""
    import tifffile

    path = Path(path)
    sizes = [(spec.width, spec.height)]
    while max(sizes[-1]) // 4 >= 1024:
        sizes.append((sizes[-1][0] // 4, sizes[-1][1] // 4))
    opts: dict[str, Any] = {"tile": (tile, tile), "compression": "jpeg",
                            "compressionargs": {"level": quality}, "photometric": "rgb",
                            "metadata": None}
    w0, h0 = sizes[0]
    desc = (f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
            f"JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}|Title = {MARKER}")
    levels = [_level_segments(spec, size, tile, path, opts) for size in sizes]
    with tifffile.TiffWriter(path, bigtiff=w0 * h0 > 2**31) as tw:
        for i, ((w, h), (segments, tables)) in enumerate(zip(sizes, levels, strict=True)):
            tw.write(iter(segments), shape=(h, w, 3), dtype=np.uint8,
                     description=desc if i == 0 else "Aperio Image Library v12.0.15",
                     jpegtables=tables or None, **opts)
            if i == 0:
                thumb_w = 256
                thumb_h = max(1, round(h0 * thumb_w / w0))
                tw.write(spec.render(0, 0, thumb_w, thumb_h, w0 / thumb_w),
                         description=f"Aperio Image Library v12.0.15\r\n{thumb_w}x{thumb_h}",
                         photometric="rgb", metadata=None)
    return path


def _tile_kinds(spec: SyntheticSlide, size: tuple[int, int], tile: int) -> np.ndarray:
    """Per tile of a level (rows, cols): 0 glass, 1 wholly tissue, 2 crossing an edge."""
    w, h = size
    sx, sy = spec.width / w, spec.height / h
    nx, ny = -(-w // tile), -(-h // tile)
    f = np.linspace(0.0, 1.0, 9)
    xs = ((np.arange(nx)[:, None] + f[None, :]) * tile * sx).ravel()
    ys = ((np.arange(ny)[:, None] + f[None, :]) * tile * sy).ravel()
    inside = spec.tissue_mask(xs[None, :], ys[:, None]).reshape(ny, 9, nx, 9)
    frac = inside.mean(axis=(1, 3))
    return np.where(frac == 0, 0, np.where(frac == 1, 1, 2))


def _level_segments(spec: SyntheticSlide, size: tuple[int, int], tile: int, path: Path,
                    opts: dict[str, Any]) -> tuple[list[bytes], bytes | None]:
    """JPEG bytes of every tile of one level (row by row) and the JPEG tables."""
    w, h = size
    sx, sy = spec.width / w, spec.height / h
    kinds = _tile_kinds(spec, size, tile)
    edge = np.argwhere(kinds == 2)
    inner = np.argwhere(kinds == 1)
    pick = inner[np.linspace(0, len(inner) - 1, min(len(inner), INTERIOR_VARIANTS)).astype(int)]
    glass = np.broadcast_to(WHITE, (tile, tile, 3)).astype(np.uint8)
    distinct = [glass] + [spec.render(c * tile * sx, r * tile * sy, tile, tile, sx, sy)
                          for r, c in (*pick, *edge)]
    encoded, tables = encoded_tiles(path.with_suffix(".sample.tif"),
                                    np.concatenate(distinct, axis=0), opts)
    index = np.zeros(kinds.shape, np.int64)
    if len(pick):
        rows, cols = np.nonzero(kinds == 1)
        index[rows, cols] = 1 + (rows * 7 + cols * 3) % len(pick)
    index[edge[:, 0], edge[:, 1]] = 1 + len(pick) + np.arange(len(edge))
    return [encoded[i] for i in index.ravel()], tables


def _hash01(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per integer pair."""
    a = np.asarray(a, np.float64).astype(np.int64).astype(np.uint64)
    b = np.asarray(b, np.float64).astype(np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = a * np.uint64(0x9E3779B97F4A7C15) ^ (b + np.uint64(seed)) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def encoded_tiles(sample: Path, image: np.ndarray, opts: Mapping[str, Any]
                  ) -> tuple[list[bytes], bytes | None]:
    """The compressed tiles (in file order) and JPEG tables of ``image`` written with
    tifffile ``opts`` to the scratch file ``sample``, which is removed again."""
    import tifffile

    tifffile.imwrite(sample, image, **opts)
    try:
        with tifffile.TiffFile(sample) as tf:
            page = tf.pages[0]
            fh = tf.filehandle
            encoded = []
            for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(off)
                encoded.append(fh.read(cnt))
            return encoded, page.jpegtables
    finally:
        sample.unlink()
