"""Declared decode steps: raw detection heads -> the task's standard per-tile outputs.

A spec's ``decode`` section (see :mod:`submodel_spec`) names the head; the runtime turns
its outputs into ``boxes``/``points``, ``scores`` and ``labels`` (B, P, ...) in tile px,
padded with score -1, before the accumulator maps them to level 0 and de-duplicates
them across tiles.

- ``yolov5`` and ``yolov7``: (B, N, 5+nc) rows x, y, w, h, objectness, class scores;
  score = objectness x best class score, except for a one-class ``yolov7``, scored by
  objectness alone (as YOLOv7's ``non_max_suppression`` does: its class score is not
  trained when there is one class).
- ``yolov8`` (and later): (B, 4+nc, N) x, y, w, h, class scores; score = best class score.
  Both: candidates at or above the spec's ``score_threshold``, class-aware NMS per tile at
  its ``iou_threshold`` (torchvision ``nms`` per tile, classes shifted apart) over its
  ``MAX_NMS`` best candidates, at most ``max_detections`` kept (YOLOv5/v7's and
  ultralytics' ``non_max_suppression`` defaults: 30,000 and 300).
- ``p2pnet``: ``pred_logits`` (B, N, K+1) and ``pred_points`` (B, N, 2): softmax over the
  K+1 logits, the background column dropped, score and label = best remaining class;
  points as given (tile px); only points at or above the spec's ``score_threshold`` are
  passed on (the softmax runs only where a class's logit beats the background's enough).
"""

from __future__ import annotations

import numpy as np

from wsi_assist.errors import ModelError
from wsi_assist.models.submodel_nms import box_pairs, greedy_keep
from wsi_assist.models.submodel_spec import DecodeSpec, SubmodelSpec, head_axes


def decode_outputs(spec: SubmodelSpec, dec: DecodeSpec, outputs: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """The standard outputs of ``spec``'s task from its head's raw ``outputs``; ModelError
    when their shapes do not fit the head (axes the model left symbolic are checked
    here, on the arrays)."""
    raw = [np.asarray(outputs[n]) for n in dec.output_names]
    o = spec.output
    _check_shapes(spec, dec, raw)
    if dec.head == "p2pnet":
        return decode_p2pnet(raw[0], raw[1], dec.background, o.score_threshold)
    return decode_yolo(raw[0], dec, len(o.classes), o.score_threshold, o.iou_threshold)


def _check_shapes(spec: SubmodelSpec, dec: DecodeSpec, raw: list[np.ndarray]) -> None:
    n = len(spec.output.classes)
    for name, arr, (axis, size) in zip(dec.output_names, raw, head_axes(dec.head, n),
                                       strict=True):
        if arr.ndim != 3 or arr.shape[axis] != size:
            raise ModelError(f"{spec.model_path}: decode head {dec.head} with {n} classes "
                             f"expects {size} on axis {axis} of {name!r}, the model gave "
                             f"{list(arr.shape)}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _raw_threshold(threshold: float, sigmoid: bool) -> float:
    """``threshold`` on probabilities as a threshold on what the graph gives."""
    if not sigmoid:
        return threshold
    if threshold <= 0:
        return -np.inf
    return np.inf if threshold >= 1 else float(np.log(threshold / (1 - threshold)))


def decode_yolo(raw: np.ndarray, dec: DecodeSpec, n_classes: int, threshold: float,
                iou: float) -> dict[str, np.ndarray]:
    """Boxes (x0, y0, x1, y1), scores and labels per tile from a YOLO head. Only anchors
    that can reach ``threshold`` (objectness, or best class score, at or above it) are
    looked at beyond one comparison."""
    x = raw.astype(np.float32, copy=False)
    sig = dec.activation == "sigmoid"
    cut = _raw_threshold(threshold, sig)
    if dec.head == "yolov8":
        best = x[:, 4:4 + n_classes].max(axis=1)  # (B, N)
        b, i = np.nonzero(best >= cut)
        rows = x[b, :, i]  # (M, 4 + nc)
        cls = rows[:, 4:4 + n_classes]
        obj = None
    else:
        b, i = np.nonzero(x[..., 4] >= cut)  # score = objectness x class score <= objectness
        rows = x[b, i]  # (M, 5 + nc)
        cls, obj = rows[:, 5:5 + n_classes], rows[:, 4]
        if dec.head == "yolov7" and n_classes == 1:
            cls, obj = obj[:, None], None
    if sig:
        cls = _sigmoid(cls)
        obj = None if obj is None else _sigmoid(obj)
    labels = cls.argmax(axis=1)
    scores = cls[np.arange(len(cls)), labels]
    if obj is not None:
        scores = scores * obj
    ok = scores >= threshold
    b, rows, scores, labels = b[ok], rows[ok], scores[ok], labels[ok]
    xy, wh = rows[:, :2], rows[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    kept, tile = _class_aware_nms(boxes, scores, labels, b, len(x), iou, dec.max_detections)
    return _pad(kept, tile, len(x), {"boxes": boxes, "scores": scores, "labels": labels})


#: candidates per tile looked at by NMS (the best-scored ones), YOLOv5/v7's ``max_nms``
MAX_NMS = 30_000


def _class_aware_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     tile: np.ndarray, n_tiles: int, iou: float, limit: int,
                     max_nms: int = MAX_NMS) -> tuple[np.ndarray, np.ndarray]:
    """Indices NMS keeps and their tiles, by tile and best first within one (at most
    ``limit`` a tile), for the whole batch at once: boxes suppress only boxes of their own
    tile and class, and only the ``max_nms`` best candidates of a tile are
    considered. ``tile`` is sorted. The decisions equal torchvision ``nms`` run per tile
    on the boxes shifted apart by class (float32), as :func:`reference_nms` does."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    by_score = np.lexsort((-scores, tile))  # by tile, best first, ties by index
    cand = by_score[_rank_in_group(tile[by_score]) < max_nms]
    span = 2.0 * float(np.abs(boxes).max()) + 1.0
    shifted = (boxes[cand] + (labels[cand] * span)[:, None]).astype(np.float32)
    group = tile[cand].astype(np.int64) * (int(labels.max()) + 1) + labels[cand]
    a, b = box_pairs(shifted, iou, group)
    kept = cand[greedy_keep(scores[cand].astype(np.float32), a, b)]
    kept = kept[np.lexsort((-scores[kept], tile[kept]))]
    kept = kept[_rank_in_group(tile[kept]) < limit]
    return kept, tile[kept]


def _rank_in_group(sorted_ids: np.ndarray) -> np.ndarray:
    """0, 1, 2 ... within each run of equal values of ``sorted_ids``."""
    n = len(sorted_ids)
    start = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]] if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return np.arange(n) - first


def reference_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  tile: np.ndarray, n_tiles: int, iou: float, limit: int,
                  max_nms: int = MAX_NMS) -> list[np.ndarray]:
    """The straightforward form of :func:`_class_aware_nms` (torchvision ``nms`` tile by
    tile), per tile the kept indices best first; for tests and benchmarks."""
    import torch
    from torchvision.ops import nms

    bounds = np.searchsorted(tile, np.arange(n_tiles + 1))
    kept = [np.zeros(0, np.int64)] * n_tiles
    if len(boxes) == 0:
        return kept
    span = 2.0 * float(np.abs(boxes).max()) + 1.0
    shifted = torch.from_numpy((boxes + (labels * span)[:, None]).astype(np.float32))
    s = torch.from_numpy(scores.astype(np.float32, copy=False))
    for t in np.nonzero(np.diff(bounds))[0].tolist():
        idx = np.arange(bounds[t], bounds[t + 1])
        if len(idx) > max_nms:
            idx = idx[np.argsort(-scores[idx], kind="stable")[:max_nms]]
        ti = torch.from_numpy(idx)
        kept[t] = idx[nms(shifted[ti], s[ti], iou).numpy()[:limit]]
    return kept


def _pad(kept: np.ndarray, tile: np.ndarray, n_tiles: int, found: dict[str, np.ndarray]
         ) -> dict[str, np.ndarray]:
    """(B, P, ...) arrays of the detections ``kept`` (in ``tile``, sorted by tile and best
    first within one); empty rows get score -1."""
    rank = _rank_in_group(tile)
    width = max(1, int(rank.max()) + 1 if len(rank) else 1)
    out: dict[str, np.ndarray] = {}
    for key, v in found.items():
        fill = -1.0 if key == "scores" else 0
        arr = np.full((n_tiles, width, *v.shape[1:]), fill, v.dtype)
        arr[tile, rank] = v[kept]
        out[key] = arr
    return out


def decode_p2pnet(logits: np.ndarray, points: np.ndarray, background: str,
                  threshold: float = 0.0) -> dict[str, np.ndarray]:
    """Points, scores and labels per tile from P2PNet-style logits and points, only the
    points scoring at or above ``threshold`` (all of them at 0), padded (score -1) as
    :func:`decode_yolo`'s. A class's softmax probability is at most e_k / (e_k + e_bg), so
    it reaches t only when its logit beats the background's by logit(t): the softmax runs
    on those points alone."""
    logits = logits.astype(np.float32, copy=False)
    k1 = logits.shape[-1]
    bg, fg = (0, range(1, k1)) if background == "first" else (k1 - 1, range(k1 - 1))
    margin = logits[..., fg[0]].copy()  # column by column: numpy reduces a short last
    for k in fg[1:]:  # axis slowly
        np.maximum(margin, logits[..., k], out=margin)
    margin -= logits[..., bg]
    cut = _raw_threshold(threshold, sigmoid=True)  # logit(t)
    b, i = np.nonzero(margin >= cut - 1e-4)  # slack for float rounding: decided below
    x = logits[b, i]  # (M, K+1)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    probs = e[:, fg.start:fg.stop] / e.sum(axis=1, keepdims=True)
    labels = probs.argmax(axis=1)
    scores = probs[np.arange(len(probs)), labels]
    ok = scores >= threshold
    found = {"points": np.asarray(points, np.float32)[b[ok], i[ok]], "scores": scores[ok],
             "labels": labels[ok].astype(np.int64)}
    return _pad(np.arange(int(ok.sum())), b[ok], len(logits), found)
