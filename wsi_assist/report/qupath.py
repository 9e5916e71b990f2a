"""``annotations.geojson``: every stored finding of a slide as QuPath objects.

Tissue pieces and class regions are annotations; tiles (optional) are ``tile`` objects
with class probabilities as measurements; sub-model points and boxes are detections;
nuclei of the built-in analysis are detections with their outlines, QuPath's measurements
and classes (Positive/Negative or 1+/2+/3+/Negative, unclassified without DAB);
segmentation findings (``findings/<name>.geojson``) are passed through. Features are
generated lazily and streamed to disk, reading stored arrays a chunk at a time, so a
slide with hundreds of thousands of detections is never held in memory twice.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist import geojson
from wsi_assist.aggregate import ClassRegion
from wsi_assist.store import (
    SUB_BOXES,
    SUB_LABELS,
    SUB_MEASUREMENTS,
    SUB_POINTS,
    SUB_POLYGON_OFFSETS,
    SUB_POLYGONS,
    SUB_PROBS,
    SUB_SCORES,
    SlideStore,
    SubmodelRecord,
    ZeroShot,
)
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

Feature = dict[str, Any]
ANNOTATIONS_FILE = "annotations.geojson"
CHUNK = 65536
DETECTION_CHUNK = 16384  # detections per read; bounds memory while streaming


def region_features(regions: Iterable[ClassRegion]) -> Iterator[Feature]:
    """One annotation per class region (MultiPolygon), with area and tissue fraction."""
    for r in regions:
        if r.geometry.is_empty:
            continue
        m = {"Area mm^2": r.area_mm2, "Tiles": r.n_tiles}
        if r.fraction is not None:
            m["Fraction of tissue"] = r.fraction
        yield geojson.feature(r.geometry, "annotation", classification=(r.name, r.color),
                              name=f"{r.name} region", measurements=m)


def tile_features(grid: TileGrid, zs: ZeroShot | None,
                  tile_subs: Iterable[SubmodelRecord] = ()) -> Iterator[Feature]:
    """One ``tile`` object per tile: top zero-shot class, probabilities as measurements."""
    subs = [s for s in tile_subs if SUB_PROBS in s.arrays]
    n = len(grid.coords)
    if not n:
        return
    # measurement names, once per slide
    zs_keys = [] if zs is None else [f"p({c})" for c in zs.classes]
    sub_keys = [[f"{s.name}: p({c})" for c in s.classes
                 or [str(j) for j in range(s.arrays[SUB_PROBS].shape[1])]] for s in subs]
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        probs = None if zs is None else np.asarray(zs.probs[start:stop], np.float64)
        sub_probs = [np.asarray(s.arrays[SUB_PROBS][start:stop], np.float64) for s in subs]
        boxes = grid.boxes(np.arange(start, stop))
        for i, box in enumerate(boxes):
            m: dict[str, float] = {}
            cls = None
            if zs is not None and probs is not None:
                m.update(zip(zs_keys, probs[i], strict=True))
                k = int(zs.top[start + i])
                cls = (zs.classes[k], zs.colors[k])
            for keys, sp in zip(sub_keys, sub_probs, strict=True):
                m.update(zip(keys, sp[i], strict=False))
            yield geojson.feature(box, "tile", classification=cls, measurements=m)


def detection_features(sub: SubmodelRecord) -> Iterator[Feature]:
    """Points or boxes of a detection sub-model as QuPath detections, chunk by chunk.

    Built as plain dicts (the hot path of slides with 10^5..10^6 cells): same layout as
    :func:`wsi_assist.geojson.feature`, from coordinates that are finite by construction.
    """
    g = sub.arrays
    kind = SUB_POINTS if SUB_POINTS in g else SUB_BOXES if SUB_BOXES in g else None
    if kind is None:
        return
    arr = g[kind]
    names = sub.measurement_names
    n_classes = max(len(sub.classes), 1)
    classes = {k: _classification(sub, k) for k in range(n_classes)}
    meta = {"sub-model": sub.name}
    n = arr.shape[0]
    if not n:
        return
    has_labels, has_scores, has_meas = SUB_LABELS in g, SUB_SCORES in g, SUB_MEASUREMENTS in g
    keys = (["Score"] if has_scores else []) + (
        [names[j] if j < len(names) else f"m{j}" for j in range(g[SUB_MEASUREMENTS].shape[1])]
        if has_meas else [])
    for start in range(0, n, DETECTION_CHUNK):
        stop = min(n, start + DETECTION_CHUNK)
        xy = np.asarray(arr[start:stop], np.float64)
        finite = np.asarray(np.isfinite(xy).all(axis=1), dtype=bool)
        labels = (np.asarray(g[SUB_LABELS][start:stop], np.int64) if has_labels
                  else np.zeros(stop - start, np.int64))
        cols = []
        if has_scores:
            cols.append(np.asarray(g[SUB_SCORES][start:stop], np.float64)[:, None])
        if has_meas:
            cols.append(np.asarray(g[SUB_MEASUREMENTS][start:stop], np.float64))
        values = np.concatenate(cols, axis=1).tolist() if cols else None
        ids = _uuid4s(stop - start)
        for i, (row, label, ok) in enumerate(zip(xy.tolist(), labels.tolist(), finite,
                                                 strict=True)):
            if not ok:
                continue
            props: dict[str, Any] = {"objectType": "detection",
                                     "classification": classes.get(label)
                                     or _classification(sub, label), "metadata": meta}
            if values is not None:
                props["measurements"] = {k: v for k, v in zip(keys, values[i], strict=True)
                                         if math.isfinite(v)}
            yield {"type": "Feature", "id": ids[i], "geometry": _geometry(kind, row),
                   "properties": props}


def nucleus_features(sub: SubmodelRecord) -> Iterator[Feature]:
    """Nuclei stored with outlines as QuPath detections (Polygon geometry, level-0 px),
    chunk by chunk: their classification (none when the slide has no DAB to score) and
    every measurement under QuPath's name."""
    g = sub.arrays
    if SUB_POLYGONS not in g or SUB_POLYGON_OFFSETS not in g:
        return
    offsets = np.asarray(g[SUB_POLYGON_OFFSETS][...], np.int64)
    n = len(offsets) - 1
    names = sub.measurement_names
    classified = bool(sub.attrs.get("classified", True))
    classes = {k: _classification(sub, k) for k in range(len(sub.classes))}
    meta = {"sub-model": sub.name}
    has_meas = SUB_MEASUREMENTS in g
    for start in range(0, n, DETECTION_CHUNK):
        stop = min(n, start + DETECTION_CHUNK)
        lo, hi = int(offsets[start]), int(offsets[stop])
        xy = np.asarray(g[SUB_POLYGONS][lo:hi], np.float64)
        labels = np.asarray(g[SUB_LABELS][start:stop], np.int64).tolist()
        values = (np.asarray(g[SUB_MEASUREMENTS][start:stop], np.float64).tolist()
                  if has_meas else None)
        ids = _uuid4s(stop - start)
        for i in range(stop - start):
            ring = xy[offsets[start + i] - lo:offsets[start + i + 1] - lo]
            props: dict[str, Any] = {"objectType": "detection", "metadata": meta}
            if classified:
                props["classification"] = classes.get(labels[i]) or _classification(
                    sub, labels[i])
            if values is not None:
                props["measurements"] = {k: v for k, v in zip(names, values[i], strict=False)
                                         if math.isfinite(v)}
            coords = ring.tolist()
            coords.append(coords[0])
            yield {"type": "Feature", "id": ids[i],
                   "geometry": {"type": "Polygon", "coordinates": [coords]},
                   "properties": props}


def _geometry(kind: str, row: list[float]) -> dict[str, Any]:
    if kind == "points":
        return {"type": "Point", "coordinates": row}
    x0, y0, x1, y1 = min(row[0], row[2]), min(row[1], row[3]), max(row[0], row[2]), \
        max(row[1], row[3])
    if x1 == x0 or y1 == y0:  # a degenerate box is still a valid QuPath object
        return {"type": "Point", "coordinates": [(x0 + x1) / 2, (y0 + y1) / 2]}
    return {"type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _classification(sub: SubmodelRecord, label: int) -> dict[str, Any]:
    name, color = sub.color(label)
    return {"name": name, "color": list(color)}


def _uuid4s(n: int) -> list[str]:
    """``n`` random (version 4) UUID strings, made in one go."""
    raw = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    h = raw.tobytes().hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-"
            f"{h[i + 20:i + 32]}" for i in range(0, 32 * n, 32)]


def segmentation_features(path: Path, name: str) -> Iterator[Feature]:
    """Features of a stored segmentation finding, checked and normalised for QuPath."""
    for f in geojson.read_features(path):
        props = dict(f.get("properties") or {})
        props.setdefault("objectType", "annotation")
        if props["objectType"] not in geojson.OBJECT_TYPES:
            log.warning("%s: objectType %r replaced by 'annotation'", path,
                        props["objectType"])
            props["objectType"] = "annotation"
        meta = dict(props.get("metadata") or {})
        meta.setdefault("sub-model", name)
        props["metadata"] = {str(k): str(v) for k, v in meta.items()}
        fid = f.get("id")
        yield {"type": "Feature", "id": fid if _is_uuid(fid) else str(uuid.uuid4()),
               "geometry": f["geometry"], "properties": props}


def all_features(store: SlideStore, regions: list[ClassRegion], grid: TileGrid | None,
                 zs: ZeroShot | None, subs: list[SubmodelRecord], include_tiles: bool
                 ) -> Iterator[Feature]:
    """Every feature of ``annotations.geojson``, lazily, in drawing order."""
    parts: list[Iterable[Feature]] = [store.tissue_features(), region_features(regions)]
    if include_tiles and grid is not None:
        parts.append(tile_features(grid, zs, [s for s in subs
                                              if s.task == "tile-classification"]))
    parts.extend(nucleus_features(s) if SUB_POLYGONS in s.arrays else detection_features(s)
                 for s in subs if not s.attrs.get("geojson"))  # those: findings files below
    parts.extend(segmentation_features(p, p.stem) for p in store.findings_files())
    return itertools.chain.from_iterable(parts)


def write_annotations(store: SlideStore, regions: list[ClassRegion], grid: TileGrid | None,
                      zs: ZeroShot | None, subs: list[SubmodelRecord], *,
                      include_tiles: bool = False) -> int:
    """Stream ``annotations.geojson`` into the slide folder; returns the feature count."""
    feats = all_features(store, regions, grid, zs, subs, include_tiles)
    return geojson.write_features(store.folder / ANNOTATIONS_FILE, feats)


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True
