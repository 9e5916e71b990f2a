"""The report's pictures: class overlay, heatmaps and representative tiles, as PNG files.

All are drawn from the stored overview (attr ``downsample``); representative tiles are
read from the slide when its file is at hand, else cropped from the overview.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image

from wsi_assist import aggregate, channels
from wsi_assist.aggregate import ClassRegion
from wsi_assist.errors import WsiAssistError
from wsi_assist.settings import ReportParams
from wsi_assist.slide import describe, slide_layout
from wsi_assist.store import (
    SUB_LABELS,
    SUB_MEASUREMENTS,
    SUB_POINTS,
    SUB_POLYGON_OFFSETS,
    SUB_POLYGONS,
    SubmodelRecord,
    ZeroShot,
)
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


def file_name(name: str) -> str:
    """A class name as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "class"


def overlay_and_heatmaps(out_dir: Path, overview: np.ndarray, downsample: float,
                         grid: TileGrid | None, zs: ZeroShot | None,
                         regions: list[ClassRegion], tissue: shapely.Geometry,
                         mpp: float, params: ReportParams,
                         origin: tuple[float, float] = (0.0, 0.0),
                         overlay_px: int | None = None) -> dict[str, Any]:
    """Write ``overlays/classes.png`` (``overlay_px`` on its long side, default
    ``report.image_px``) and ``overlays/heatmap_<class>.png`` on the picture ``overview``
    (its first pixel at level-0 ``origin``); returns their paths relative to ``out_dir``."""
    folder = out_dir / "overlays"
    folder.mkdir(exist_ok=True)
    bounds = picture_bounds(tissue, grid)
    img = aggregate.class_overlay(overview, downsample, regions, tissue, mpp,
                                  max_px=overlay_px or params.image_px, bounds=bounds,
                                  origin=origin,
                                  title="Tissue classes (zero-shot)" if regions
                                  else "Tissue")
    img.save(folder / "classes.png")
    out: dict[str, Any] = {"overlay": "overlays/classes.png", "heatmaps": {}}
    if zs is None or grid is None or not len(grid.coords):
        return out
    for k in heatmap_classes(zs, params):
        probs = np.asarray(zs.probs[:, k], np.float32)
        name = zs.classes[k]
        hm = aggregate.heatmap(overview, downsample, grid, probs,
                               f"{name}: tile probability", max_px=params.image_px // 2 + 64,
                               bounds=bounds, origin=origin)
        rel = f"overlays/heatmap_{k:02d}_{file_name(name)}.png"
        hm.save(out_dir / rel)
        out["heatmaps"][name] = rel
    return out


def heatmap_classes(zs: ZeroShot, params: ReportParams) -> list[int]:
    """Class indices to draw: the configured ones, else the most frequent classes."""
    if params.heatmap_classes is not None:
        unknown = [c for c in params.heatmap_classes if c not in zs.classes]
        if unknown:
            log.warning("report.heatmap_classes: %r not among the classes %r", unknown,
                        zs.classes)
        idx = [zs.classes.index(c) for c in params.heatmap_classes if c in zs.classes]
    else:
        counts = np.bincount(zs.top, minlength=len(zs.classes))
        idx = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    return idx[:params.max_heatmaps]


def picture_bounds(tissue: shapely.Geometry, grid: TileGrid | None
                   ) -> tuple[float, float, float, float] | None:
    """Level-0 box around tissue and tiles, for cropping pictures to what matters."""
    boxes = [] if tissue.is_empty else [tissue.bounds]
    if grid is not None and len(grid.coords):
        lo, hi = grid.coords.min(axis=0), grid.coords.max(axis=0) + grid.size_l0
        boxes.append((float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])))
    if not boxes:
        return None
    b = np.array(boxes)
    return (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())


def pick_tiles(grid: TileGrid, zs: ZeroShot, per_class: int,
               exclude: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The most confident tiles of each class (top-1 and not excluded)."""
    probs = np.asarray(zs.probs[...], np.float32)
    out = []
    for k, name in enumerate(zs.classes):
        ok = zs.top == k
        if exclude is not None:
            ok &= ~exclude
        rows = np.flatnonzero(ok)
        best = rows[np.argsort(-probs[rows, k], kind="stable")[:per_class]]
        out += [{"row": int(r), "x": int(grid.coords[r, 0]), "y": int(grid.coords[r, 1]),
                 "size_l0": grid.size_l0, "class": name, "prob": float(probs[r, k])}
                for r in best]
    return out


def save_tiles(out_dir: Path, picks: list[dict[str, Any]], overview: np.ndarray,
               downsample: float, slide_path: Path | None, out_px: int = 224) -> None:
    """Write each pick's image to ``tiles/rep_<n>.png`` and set its ``tile_png``."""
    folder = out_dir / "tiles"
    folder.mkdir(exist_ok=True)
    slide = _open(slide_path)
    try:
        for n, p in enumerate(picks):
            img = _read(slide, p, out_px) if slide is not None else None
            if img is None:
                img = _crop(overview, downsample, p, out_px)
            rel = f"tiles/rep_{n:03d}.png"
            img.save(out_dir / rel)
            p["tile_png"] = rel
    finally:
        if slide is not None:
            slide.close()


def _open(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    from wsi_assist.errors import SlideError
    from wsi_assist.slide import open_slide

    try:
        return open_slide(path)
    except SlideError as e:
        log.info("tiles for the report cropped from the overview: %s", e)
        return None


def _read(slide: Any, p: dict[str, Any], out_px: int) -> Image.Image | None:
    size = round(p["size_l0"])
    level = slide.get_best_level_for_downsample(max(1.0, size / out_px))
    ds = slide.level_downsamples[level]
    side = max(1, round(size / ds))
    try:
        region = slide.read_region((p["x"], p["y"]), level, (side, side))
    except (OSError, ValueError) as e:
        log.warning("tile at %s,%s unreadable (%s); cropped from the overview",
                    p["x"], p["y"], e)
        return None
    return region.convert("RGB").resize((out_px, out_px), Image.Resampling.LANCZOS)


def _crop(overview: np.ndarray, downsample: float, p: dict[str, Any], out_px: int
          ) -> Image.Image:
    x0, y0 = int(p["x"] / downsample), int(p["y"] / downsample)
    s = max(1, round(p["size_l0"] / downsample))
    crop = overview[y0:y0 + s, x0:x0 + s, :3]
    if crop.size == 0:
        crop = np.full((1, 1, 3), 255, np.uint8)
    return Image.fromarray(np.ascontiguousarray(crop)).resize(
        (out_px, out_px), Image.Resampling.BICUBIC)


#: Side of the detection picture's field, um: large enough for context, small enough that
#: nuclei are several pixels across at 640 px.
FIELD_UM = 200.0
DAB_MEAN = "Nucleus: DAB OD mean"


def nuclei_pictures(out_dir: Path, sub: SubmodelRecord, grid: TileGrid,
                    focus: np.ndarray | None, overview: np.ndarray, downsample: float,
                    slide_path: Path | None, max_px: int = 640) -> dict[str, str]:
    """For a sub-model with outlines: ``overlays/<name>_detections.png`` (the outlines on
    the sharp field with most of them, coloured by class) and, when its classes come
    from DAB, ``overlays/<name>_dab.png`` (mean nuclear DAB OD per tile). Paths are
    relative to ``out_dir``; none when there is nothing to draw."""
    if SUB_POLYGONS not in sub.arrays or not len(grid) or not sub.arrays[SUB_POINTS].shape[0]:
        return {}
    folder = out_dir / "overlays"
    folder.mkdir(exist_ok=True)
    pts = sub.read(SUB_POINTS).astype(np.float64)
    labels = sub.read(SUB_LABELS).astype(np.int64)
    owner = grid.owners(pts)
    counts = np.bincount(owner[owner >= 0], minlength=len(grid)).astype(np.float64)
    if focus is not None and len(focus) == len(grid) and np.isfinite(focus).any():
        counts[focus < np.nanmedian(focus)] = -1  # the sharper half of the tiles
    centre = grid.coords[int(np.argmax(counts))] + grid.size_l0 / 2
    side = FIELD_UM / grid.mpp
    x0, y0 = (float(v) for v in np.maximum(centre - side / 2, 0))
    field = _field(slide_path, x0, y0, side, max_px) or _crop(
        overview, downsample, {"x": x0, "y": y0, "size_l0": side}, max_px)
    scale = field.width / side
    offsets, verts = sub.read(SUB_POLYGON_OFFSETS), sub.read(SUB_POLYGONS)
    inside = np.flatnonzero((pts[:, 0] >= x0) & (pts[:, 0] < x0 + side)
                            & (pts[:, 1] >= y0) & (pts[:, 1] < y0 + side))
    outlines = [((verts[offsets[i]:offsets[i + 1]] - (x0, y0)) * scale,
                 sub.color(int(labels[i]))[1]) for i in inside]
    entries = [sub.color(k) for k in range(len(sub.classes))]
    img = aggregate.outlines(field, outlines, entries, grid.mpp / scale,
                             f"{sub.name}: {len(inside)} objects in a {FIELD_UM:g} um field")
    rel = {"detections": f"overlays/{file_name(sub.name)}_detections.png"}
    img.save(out_dir / rel["detections"])
    names = sub.measurement_names
    if sub.attrs.get("classified") and DAB_MEAN in names:
        dab = sub.read(SUB_MEASUREMENTS)[:, names.index(DAB_MEAN)].astype(np.float64)
        ok = owner >= 0
        total = np.bincount(owner[ok], weights=dab[ok], minlength=len(grid))
        n = np.bincount(owner[ok], minlength=len(grid))
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        top = _strongest_threshold(sub.attrs.get("parameters") or {})
        hm = aggregate.heatmap(overview, downsample, grid, np.clip(mean, 0, top),
                               f"{sub.name}: mean nuclear DAB OD per tile",
                               max_px=max_px, label="DAB OD", vmax=top)
        rel["dab_heatmap"] = f"overlays/{file_name(sub.name)}_dab.png"
        hm.save(out_dir / rel["dab_heatmap"])
    return rel


def _field(slide_path: Path | None, x0: float, y0: float, side: float, out_px: int
           ) -> Image.Image | None:
    slide = _open(slide_path)
    if slide is None:
        return None
    try:
        p = {"x": int(x0), "y": int(y0), "size_l0": side}
        if slide_layout(slide) == "channels" and slide_path is not None:
            return _channel_field(slide, slide_path, p, out_px)
        return _read(slide, p, out_px)
    finally:
        slide.close()


def _channel_field(slide: Any, slide_path: Path, p: dict[str, Any], out_px: int
                   ) -> Image.Image | None:
    """A field of a multichannel slide, read from its planes and pseudo-coloured (each
    channel scaled between its percentiles in the field, tinted, added)."""
    size = round(p["size_l0"])
    level = slide.get_best_level_for_downsample(max(1.0, size / out_px))
    side = max(1, round(size / slide.level_downsamples[level]))
    try:
        planes = np.asarray(slide.read_region((p["x"], p["y"]), level, (side, side),
                                              as_array=True))
        info = describe(slide_path)
    except (OSError, ValueError, WsiAssistError) as e:
        log.warning("field at %s,%s unreadable (%s); cropped from the overview",
                    p["x"], p["y"], e)
        return None
    if planes.ndim == 2:
        planes = planes[..., None]
    if planes.shape[2] != len(info.channels):
        return None
    colors = channels.display_colors(info.channels, info.channel_colors)
    rgb = channels.pseudo_color(planes, colors, field_levels(planes))
    return Image.fromarray(rgb).resize((out_px, out_px), Image.Resampling.LANCZOS)


#: A channel's high level in a field is at least this many times its pixel noise above
#: its low level: a channel with no signal in the field shows as a faint haze, not as
#: noise stretched to full brightness.
NOISE_SPAN = 20.0


def field_levels(planes: np.ndarray) -> np.ndarray:
    """(C, 2) display levels of a field (H, W, C): :func:`channels.levels`, the high one
    raised to :data:`NOISE_SPAN` noise sigmas above the low one (sigma from the median
    absolute difference of horizontal neighbours, which signal hardly moves)."""
    lv = channels.levels(planes)
    diff = np.abs(np.diff(planes.astype(np.float32), axis=1)).reshape(-1, planes.shape[2])
    sigma = np.median(diff, axis=0) / (0.6745 * np.sqrt(2)) if diff.size else 0.0
    lv[:, 1] = np.maximum(lv[:, 1], lv[:, 0] + NOISE_SPAN * sigma)
    return lv


def _strongest_threshold(parameters: dict[str, Any]) -> float:
    """The top of the DAB scale: QuPath's 3+ threshold (``thresholdPositive3``), else 0.6."""
    try:
        value = float(parameters.get("thresholdPositive3", 0.6))
    except (TypeError, ValueError):
        return 0.6
    return value if value > 0 else 0.6
