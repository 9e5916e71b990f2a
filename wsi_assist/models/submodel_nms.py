"""Greedy NMS that compares each detection with its spatial neighbours only.

Greedy NMS (best score first, ties by index; a detection is dropped when a kept,
better-ranked one suppresses it) depends only on the pairs that can suppress each other,
so :func:`box_pairs` / :func:`point_pairs` find those pairs among near neighbours (size
classes and a sweep along x; a k-d tree) and :func:`greedy_keep` resolves the greedy
order over them in a few vectorised rounds. The decisions equal torchvision's ``nms``
(IoU computed in float32 by the same formula, suppression when IoU > threshold) and the
straightforward loop for points (distance <= radius); torchvision's own loop looks at
every later box for each kept one, O(n x kept), which over a whole slide's detections
costs seconds.
"""

from __future__ import annotations

import numpy as np

#: vectorised rounds of :func:`greedy_keep` before the rest is resolved one by one
MAX_ROUNDS = 64
#: size classes per axis in :func:`box_pairs` (boxes smaller still share the smallest)
SIZE_CLASSES = 12
#: largest / median side beyond which :func:`box_pairs` considers size classes
SIZE_SPREAD = 4.0


def greedy_keep(scores: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean mask of the detections greedy NMS keeps, given the pairs ``(a[k], b[k])``
    that suppress each other (the better-ranked suppresses the other when it is kept).
    Rank: descending score, ties by index (a stable sort, as torchvision's)."""
    n = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    first = rank[a] < rank[b]
    hi, lo = np.where(first, a, b), np.where(first, b, a)
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 suppressed
    below = np.zeros(n, bool)
    below[lo] = True
    state[~below] = 1  # nothing better-ranked can suppress it
    for _ in range(MAX_ROUNDS):
        state[lo[state[hi] == 1]] = 2
        live = state[lo] == 0
        hi, lo = hi[live], lo[live]
        if len(lo) == 0:
            return state == 1
        blocked = np.zeros(n, bool)
        blocked[lo[state[hi] == 0]] = True  # a better-ranked one still undecided
        state[(state == 0) & ~blocked] = 1
    _resolve_in_order(state, rank, hi, lo)
    return state == 1


def _resolve_in_order(state: np.ndarray, rank: np.ndarray, hi: np.ndarray, lo: np.ndarray
                      ) -> None:
    """The undecided rest one by one in rank order (long suppression chains only)."""
    by_lo = np.argsort(lo, kind="stable")
    hi, lo = hi[by_lo], lo[by_lo]
    undecided = np.nonzero(state == 0)[0]
    starts = np.searchsorted(lo, undecided)
    ends = np.searchsorted(lo, undecided, side="right")
    for k in np.argsort(rank[undecided]).tolist():
        above = hi[starts[k]:ends[k]]
        state[undecided[k]] = 2 if (state[above] == 1).any() else 1


def point_pairs(points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of points at most ``radius`` apart (a k-d tree)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(points, balanced_tree=False, compact_nodes=False)  # faster to build
    pairs = tree.query_pairs(radius, output_type="ndarray")
    return pairs[:, 0], pairs[:, 1]


def box_pairs(boxes: np.ndarray, iou: float, group: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of boxes (x0, y0, x1, y1) with IoU > ``iou`` (float32, torchvision's formula),
    of the same ``group`` when given. IoU > t needs an overlap above t x either side along
    each axis, so the widths of two such boxes differ by less than a factor 1/t, and so
    do their heights: boxes are put in size classes of that ratio along each axis, and
    each class is searched (:class:`_Sweep`) with its neighbours on one side only, so
    that large or elongated boxes do not widen the search of every other one. Boxes of
    like sizes (largest side within ``SIZE_SPREAD`` x the median), or classes that would
    look at more candidates than one sweep over all, get the one sweep."""
    n = len(boxes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bx = np.asarray(boxes, np.float64)
    whole = _Sweep(bx, iou, group)
    ratio = iou * (1 - 1e-3)  # slack for the float32 IoU
    ext = np.maximum(bx[:, 2:] - bx[:, :2], 0.0)
    spread = float((ext.max(axis=0) / np.maximum(np.median(ext, axis=0), 1e-30)).max())
    if ratio > 0 and spread > SIZE_SPREAD:  # the largest widen every box's search
        parts = _by_size_class(bx, ext, iou, group, ratio)
        if sum(p.count for _, _, p in parts) < whole.count:  # fewer candidates apart
            found = []
            for idx, one_of, part in parts:
                a, b = part.pairs()
                a, b = idx[a], idx[b]
                keep = one_of[a] | one_of[b]  # pairs with one box of the class
                found.append((a[keep], b[keep]))
            a, b = (np.concatenate(v) for v in zip(*found, strict=True))
            return _over(boxes, iou, a, b)
    return _over(boxes, iou, *whole.pairs())


def _over(boxes: np.ndarray, iou: float, a: np.ndarray, b: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs whose float32 IoU is over ``iou`` (compared as a double, as
    torchvision does)."""
    ok = box_iou_pairs(np.asarray(boxes, np.float32), a, b).astype(np.float64) > iou
    return a[ok], b[ok]


def _by_size_class(bx: np.ndarray, ext: np.ndarray, iou: float, group: np.ndarray | None,
                   ratio: float) -> list[tuple[np.ndarray, np.ndarray, _Sweep]]:
    """Per size class (width and height classes of ``ratio``): the indices of its boxes
    and of those in the classes after it (one wider, one taller or shorter, or as wide and
    one taller: 4 of the 8 neighbours), a mask of the class's own boxes, and the sweep
    over them. ``ext``: the boxes' widths and heights."""
    k = np.floor(np.log(np.maximum(ext, 1e-30)) / -np.log(ratio)).astype(np.int64)
    k = np.maximum(k, k.max(axis=0) - SIZE_CLASSES + 1)  # the tiniest share one
    k -= k.min(axis=0)
    step = int(k[:, 1].max()) + 3
    cls = k[:, 0] * step + k[:, 1] + 1  # (width class, height class) as one id
    order = np.argsort(cls, kind="stable")
    sorted_cls = cls[order]
    parts = []
    for c in np.unique(cls).tolist():
        lo, hi, lo2, hi2 = np.searchsorted(
            sorted_cls, [c, c + 2, c + step - 1, c + step + 2]).tolist()
        idx = order[np.r_[lo:hi, lo2:hi2]]  # c, c + 1; the next width class's 3
        parts.append((idx, cls == c, _Sweep(bx[idx], iou, None if group is None
                                            else group[idx])))
    return parts


class _Sweep:
    """Candidate pairs (a superset of those with IoU > ``iou``) of float64 boxes ``bx``:
    box j can meet box i only when it starts before ``x1 - t * w`` of i and within
    ``y1 - t * h`` of i, so boxes are binned by y0 (bins as tall as the longest such
    reach) and swept along x within their own bin and the next one. ``count``: how many
    candidates :meth:`pairs` will look at, known before it does."""

    def __init__(self, bx: np.ndarray, iou: float, group: np.ndarray | None) -> None:
        n = len(bx)
        self.bx, self.group = bx, group
        eps = 1e-5 * max(1.0, float(np.abs(bx).max())) if n else 0.0  # float32 rounding
        ext = np.maximum(bx[:, 2:] - bx[:, :2], 0.0)
        self.reach = np.maximum(ext * (1 - iou * (1 - 1e-3)), 0.0) + eps  # past x0, y0
        if n < 2:
            self.order = np.zeros(0, np.int64)
            self.starts = self.stops = self.order
            self.count = 0
            return
        cell = float(self.reach[:, 1].max())
        row = np.floor((bx[:, 1] - bx[:, 1].min()) / cell).astype(np.int64)
        if group is not None:  # groups' rows stacked apart
            row = row + np.asarray(group, np.int64) * (int(row.max()) + 2)
        x = bx[:, 0] - bx[:, 0].min()
        reach_x = float(self.reach[:, 0].max())
        span = float(x.max()) + 2 * reach_x + 1.0
        key = row * span + x
        self.order = order = np.argsort(key, kind="stable")
        keys = key[order]
        own = self.reach[order, 0]
        here = np.arange(n) + 1  # the same row: boxes after i in x order
        stop_here = np.searchsorted(keys, keys + own, side="right")
        nxt = keys + span  # the next row: boxes starting up to reach_x before or after i
        start_next = np.searchsorted(keys, nxt - reach_x, side="left")
        stop_next = np.searchsorted(keys, nxt + own, side="right")
        self.starts, self.stops = np.r_[here, start_next], np.r_[stop_here, stop_next]
        self.count = int(np.maximum(self.stops - self.starts, 0).sum())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.order)
        if n < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        i, j = _expand(self.starts, self.stops)
        a, b = self.order[i % n], self.order[j]
        y0, ry = self.bx[:, 1], self.reach[:, 1]
        dy = y0[b] - y0[a]
        near = (dy <= ry[a]) & (-dy <= ry[b])  # cheap before the IoU itself
        if self.group is not None:
            near &= self.group[a] == self.group[b]
        return a[near], b[near]


def _expand(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, j) for every j in [starts[k], stops[k])."""
    count = np.maximum(stops - starts, 0)
    k = np.repeat(np.arange(len(starts)), count)
    offset = np.arange(len(k)) - np.repeat(np.cumsum(count) - count, count)
    return k, starts[k] + offset


def box_iou_pairs(boxes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a[k]`` and ``b[k]``, step by step as torchvision's CPU kernel (so
    float32 boxes give its values bit for bit)."""
    ba, bb = boxes[a], boxes[b]
    area_a = (ba[:, 2] - ba[:, 0]) * (ba[:, 3] - ba[:, 1])
    area_b = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    zero = np.zeros((), boxes.dtype)
    iw = np.maximum(zero, np.minimum(ba[:, 2], bb[:, 2]) - np.maximum(ba[:, 0], bb[:, 0]))
    ih = np.maximum(zero, np.minimum(ba[:, 3], bb[:, 3]) - np.maximum(ba[:, 1], bb[:, 1]))
    inter = iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a + area_b - inter)
