"""Greedy NMS that compares each detection with its spatial neighbours only.

Greedy NMS (best score first, ties by index; a detection is dropped when a kept,
better-ranked one suppresses it) depends only on the pairs that can suppress each other,
so :func:`box_pairs` / :func:`point_pairs` find those pairs in O(n log n + pairs) (a sweep
along x, a k-d tree) and :func:`greedy_keep` resolves the greedy order over them in a few
vectorised rounds. The decisions equal torchvision's ``nms`` (IoU computed in float32 by
the same formula, suppression when IoU > threshold) and the straightforward loop for
points (distance <= radius); torchvision's own loop looks at every later box for each
kept one, O(n x kept), which over a whole slide's detections costs seconds.
"""

from __future__ import annotations

import numpy as np

#: vectorised rounds of :func:`greedy_keep` before the rest is resolved one by one
MAX_ROUNDS = 64


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
    each axis, so box j can meet box i only when it starts before ``x1 - t * w`` of i and
    within ``y1 - t * h`` of i: boxes are binned by y0 (bins as tall as the longest such
    reach) and swept along x within their own bin and the next one."""
    n = len(boxes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bx = np.asarray(boxes, np.float64)
    eps = 1e-5 * max(1.0, float(np.abs(bx).max()))  # float32 rounding of the IoU
    ext = np.maximum(bx[:, 2:] - bx[:, :2], 0.0)
    reach = np.maximum(ext * (1 - iou * (1 - 1e-3)), 0.0) + eps  # (n, 2) past x0, y0
    cell = float(reach[:, 1].max())
    row = np.floor((bx[:, 1] - bx[:, 1].min()) / cell).astype(np.int64)
    if group is not None:  # groups' rows stacked apart
        row = row + np.asarray(group, np.int64) * (int(row.max()) + 2)
    x = bx[:, 0] - bx[:, 0].min()
    reach_x = float(reach[:, 0].max())
    span = float(x.max()) + 2 * reach_x + 1.0
    key = row * span + x
    order = np.argsort(key, kind="stable")
    keys = key[order]
    here = np.arange(n) + 1  # the same row: boxes after i in x order
    stop_here = np.searchsorted(keys, keys + reach[order, 0], side="right")
    nxt = keys + span  # the next row: boxes starting up to reach_x before or after i
    start_next = np.searchsorted(keys, nxt - reach_x, side="left")
    stop_next = np.searchsorted(keys, nxt + reach[order, 0], side="right")
    i, j = _expand(np.r_[here, start_next], np.r_[stop_here, stop_next])
    a, b = order[i % n], order[j]
    y0, ry = bx[:, 1], reach[:, 1]
    dy = y0[b] - y0[a]
    near = (dy <= ry[a]) & (-dy <= ry[b])  # cheap before the IoU itself
    if group is not None:
        near &= group[a] == group[b]
    a, b = a[near], b[near]
    # float32 IoU against the threshold as a double, as torchvision compares them
    ok = box_iou_pairs(np.asarray(boxes, np.float32), a, b).astype(np.float64) > iou
    return a[ok], b[ok]


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
