"""Decoding sub-model outputs into slide findings in level-0 pixels.

One accumulator per sub-model and slide collects decoded tiles batch by batch, then
``finish()`` de-duplicates detections from neighbouring or overlapping tiles (radius
NMS for points, IoU NMS for boxes) and merges segmentation polygons across tile borders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely

from wsi_assist.models.mask_polygons import merge_polygons, tile_polygons
from wsi_assist.models.scores import evaluate
from wsi_assist.models.submodel_heads import decode_outputs
from wsi_assist.models.submodel_nms import box_pairs, greedy_keep, point_pairs
from wsi_assist.models.submodel_spec import ScoreSpec, SubmodelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileFrame:
    """Where a batch of model tiles lies: level-0 corners and model px -> level-0 px."""

    corners: np.ndarray  # (B, 2) float64 level-0 x, y
    scale: float
    model_px: int


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    """Softmax / sigmoid / identity over the class axis (1)."""
    x = x.astype(np.float32, copy=False)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def radius_nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices kept by greedy NMS: a point is dropped when a kept, higher-scored one lies
    within ``radius`` (pairs from a k-d tree, see :mod:`submodel_nms`)."""
    n = len(points)
    if n == 0 or radius <= 0:
        return np.arange(n)
    a, b = point_pairs(points, radius)
    return np.nonzero(greedy_keep(scores, a, b))[0]


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by class-agnostic IoU NMS (torchvision ``nms``'s decisions; only
    overlapping boxes are compared, see :mod:`submodel_nms`)."""
    a, b = box_pairs(boxes, iou)
    return np.nonzero(greedy_keep(np.asarray(scores, np.float32), a, b))[0]


@dataclass
class Accumulator:
    """Decoded findings of one sub-model over one slide."""

    spec: SubmodelSpec
    n_tiles: int
    mpp: float
    rows: list[np.ndarray] = field(default_factory=list)
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    polygons: dict[int, list[shapely.Geometry]] = field(default_factory=dict)
    merged: dict[int, shapely.MultiPolygon] = field(default_factory=dict)

    def _add(self, key: str, arr: np.ndarray) -> None:
        self.parts.setdefault(key, []).append(arr)

    def add(self, rows: np.ndarray, outputs: dict[str, np.ndarray], frame: TileFrame) -> None:
        """Decode one batch; ``rows`` are grid rows of the tiles."""
        task = self.spec.task
        if task == "tile-classification":
            first = next(iter(outputs.values()))
            self.rows.append(rows)
            self._add("probs", activate(first, self.spec.output.activation))
        elif task in ("point-detection", "box-detection"):
            if self.spec.decode is not None:  # a raw head: its declared decode step
                outputs = decode_outputs(self.spec, self.spec.decode, outputs)
            self._add_detections(outputs, frame)
        else:
            self._add_masks(next(iter(outputs.values())), frame)

    def _add_detections(self, out: dict[str, np.ndarray], frame: TileFrame) -> None:
        key = "points" if self.spec.task == "point-detection" else "boxes"
        scores = np.asarray(out["scores"], np.float32)
        labels = np.asarray(out["labels"])
        keep = scores >= self.spec.output.score_threshold
        bad = keep & ((labels < 0) | (labels >= len(self.spec.output.classes)))
        if bad.any():
            log.warning("sub-model %s: %d detections with labels outside its %d classes "
                        "dropped", self.spec.name, int(bad.sum()), len(self.spec.output.classes))
            keep &= ~bad
        b, p = np.nonzero(keep)
        geo = np.asarray(out[key])[b, p].astype(np.float64) * frame.scale
        reps = geo.shape[1] // 2
        geo += np.tile(frame.corners[b], (1, reps))
        self._add(key, geo)
        self._add("scores", scores[b, p])
        self._add("labels", labels[b, p].astype(np.int16))
        if "measurements" in out:
            self._add("measurements", np.asarray(out["measurements"], np.float32)[b, p])

    def _add_masks(self, logits: np.ndarray, frame: TileFrame) -> None:
        o = self.spec.output
        probs = activate(logits, o.activation)
        k = probs.shape[1]
        px_scale = frame.scale * frame.model_px / probs.shape[-1]
        if o.activation == "sigmoid":
            masks = probs >= o.score_threshold
        else:
            masks = np.eye(k, dtype=bool)[probs.argmax(axis=1)].transpose(0, 3, 1, 2)
        for t in range(len(probs)):
            for c in range(k):
                if c == o.background_index or not masks[t, c].any():
                    continue
                self.polygons.setdefault(c, []).append(
                    tile_polygons(masks[t, c], px_scale, tuple(frame.corners[t])))

    def finish(self, analysed_mm2: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays for the store and attrs (counts, scores) after de-duplication."""
        task, o = self.spec.task, self.spec.output
        arrays = {k: np.concatenate(v) for k, v in self.parts.items()}
        if task == "tile-classification":
            probs = arrays.get("probs", np.zeros((0, len(o.classes)), np.float32))
            labels = probs.argmax(axis=1).astype(np.int16)
            full_p = np.full((self.n_tiles, probs.shape[1]), np.nan, np.float32)
            full_l = np.full(self.n_tiles, -1, np.int16)
            rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
            full_p[rows], full_l[rows] = probs, labels
            arrays = {"probs": full_p, "labels": full_l}
            counts = np.bincount(labels, minlength=len(o.classes))
        elif task == "segmentation":
            arrays, counts = {}, self._merge_polygons()
        else:
            arrays = self._dedup(arrays)
            counts = np.bincount(arrays["labels"].astype(np.int64), minlength=len(o.classes))
        # every branch above counts at least one entry per class
        count_map = {c: int(counts[i]) for i, c in enumerate(o.classes)}
        scores = {n: evaluate(s, count_map, analysed_mm2)
                  for n, s in self.spec.scores.items()}
        return arrays, {"counts": count_map, "scores": scores}

    def _dedup(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = "points" if self.spec.task == "point-detection" else "boxes"
        width = 2 if key == "points" else 4
        arrays.setdefault(key, np.zeros((0, width), np.float64))
        arrays.setdefault("scores", np.zeros(0, np.float32))
        arrays.setdefault("labels", np.zeros(0, np.int16))
        if key == "points":
            keep = radius_nms(arrays[key], arrays["scores"], self.spec.output.nms_radius_um
                              / self.mpp)
        else:
            keep = box_nms(arrays[key], arrays["scores"], self.spec.output.iou_threshold)
        return {k: v[keep] for k, v in arrays.items()}

    def _merge_polygons(self) -> np.ndarray:
        o = self.spec.output
        counts = np.zeros(len(o.classes), np.int64)
        for c, parts in self.polygons.items():
            self.merged[c] = merge_polygons(parts, o.simplify_um / self.mpp,
                                            o.min_area_um2 / self.mpp**2)
            counts[c] = len(self.merged[c].geoms)
        return counts


def slide_score(spec: ScoreSpec, counts: dict[str, int], analysed_mm2: float) -> Any:
    """A score's value from class counts (a category for a categorical score); None when
    it does not apply (see :func:`wsi_assist.models.scores.evaluate`)."""
    return evaluate(spec, counts, analysed_mm2)["value"]
