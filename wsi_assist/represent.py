"""Representative tiles: per class the most confident tiles, made diverse by
farthest-point sampling on the embeddings; text-query retrieval; tiles saved as PNGs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import ModelError, StageSkipped
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pick:
    """A chosen tile: its grid row, why it was chosen (class name, query or ``tissue``)
    and the score that ranked it (class probability, query similarity, tissue fraction)."""

    row: int
    reason: str
    score: float

    def __post_init__(self) -> None:
        if self.row < 0:
            raise ValueError(f"row must be >= 0, got {self.row!r}")


def farthest_point(embeddings: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """``k`` row indices, starting at ``first``, each the farthest (cosine) from those
    already chosen. Rows are assumed L2-normalised."""
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if k <= 0 or n == 0:
        return np.zeros(0, np.int64)
    if not 0 <= first < n:
        raise ValueError(f"first must be in [0, {n}), got {first!r}")
    chosen = [first]
    dist = 1.0 - x @ x[first]
    dist[first] = -np.inf
    while len(chosen) < min(k, n):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
        dist[chosen] = -np.inf
    return np.asarray(chosen, np.int64)


def by_class(probs: np.ndarray, classes: Sequence[str], k: int,
             embeddings: np.ndarray | None = None, pool: int = 32) -> list[Pick]:
    """Per class, up to ``k`` tiles whose top class it is: the ``pool`` most probable,
    thinned to ``k`` by farthest-point sampling (starting from the most probable)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)}), got {probs.shape}")
    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    picks: list[Pick] = []
    for c, name in enumerate(classes):
        rows = np.flatnonzero(top == c)
        rows = rows[np.argsort(-probs[rows, c], kind="stable")][:max(pool, k)]
        if embeddings is not None and len(rows) > k:
            rows = rows[farthest_point(embeddings[rows], k)]
        picks += [Pick(int(r), name, float(probs[r, c])) for r in rows[:k]]
    return picks


def by_tissue(tissue_fraction: np.ndarray, k: int, embeddings: np.ndarray | None = None,
              pool: int = 32) -> list[Pick]:
    """Without classes: the tiles with most tissue made diverse on the embeddings, or,
    without embeddings, ``k`` tiles evenly spaced through the grid."""
    frac = np.asarray(tissue_fraction, dtype=np.float32)
    n = len(frac)
    if n == 0 or k <= 0:
        return []
    if embeddings is None:
        rows = np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))
    else:
        rows = np.argsort(-frac, kind="stable")[:max(pool, k)]
        rows = rows[farthest_point(embeddings[rows], k)]
    return [Pick(int(r), "tissue", float(frac[r])) for r in rows]


def retrieve(embeddings: np.ndarray, query_vec: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``k`` tiles most cosine-similar to ``query_vec``, and their similarity."""
    x = np.asarray(embeddings, dtype=np.float32)
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    if x.ndim != 2 or x.shape[1] != q.shape[0]:
        raise ValueError(f"query of dimension {q.shape[0]} does not match embeddings "
                         f"{x.shape}")
    norm = float(np.linalg.norm(q))
    if norm == 0:
        raise ValueError("query_vec is all zeros")
    sims = x @ (q / norm)
    k = min(k, len(x))
    rows = np.argsort(-sims, kind="stable")[:k]
    return rows.astype(np.int64), sims[rows]


def encode_queries(model_spec: str, texts: Sequence[str]) -> np.ndarray:
    """Query texts as text embeddings (N, D) of ``model_spec``, via
    ``wsi_assist.models.pathclip``. StageSkipped, with the reason, when the model is an
    image-only encoder (``timm:``/``hf:`` specs: no text tower), as the zeroshot stage."""
    try:
        from wsi_assist.models import pathclip
        from wsi_assist.models.encoders import IMAGE_ONLY
    except ImportError as e:
        raise StageSkipped("text queries need the PathCLIP text encoder "
                           "(wsi_assist.models.pathclip), which is not available") from e
    try:
        spec = pathclip.parse_spec(model_spec)
    except ModelError:
        spec = None  # encode_text says what is wrong with it
    if spec is not None and spec.kind in IMAGE_ONLY:
        raise StageSkipped(pathclip.no_text_tower(spec))
    return np.asarray(pathclip.encode_text(model_spec, list(texts)), dtype=np.float32)


def by_query(embeddings: np.ndarray, queries: Sequence[str], query_vecs: np.ndarray,
             k: int) -> list[Pick]:
    """For each query, its ``k`` nearest tiles, tagged ``query: <text>``."""
    picks: list[Pick] = []
    for text, vec in zip(queries, query_vecs, strict=True):
        rows, sims = retrieve(embeddings, vec, k)
        picks += [Pick(int(r), f"query: {text}", float(s)) for r, s in zip(rows, sims)]
    return picks


def unique(picks: Sequence[Pick]) -> list[Pick]:
    """Picks with repeated rows dropped (the first reason wins)."""
    seen: set[int] = set()
    out = []
    for p in picks:
        if p.row not in seen:
            seen.add(p.row)
            out.append(p)
    return out


def read_tiles(slide: Any, grid: TileGrid, rows: Sequence[int]) -> list[np.ndarray]:
    """The tiles at ``rows``, as the models saw them (tile_px square, uint8 RGB)."""
    from wsi_assist.stream import read_tile

    size = slide.level_dimensions[grid.level]
    return [read_tile(slide, grid, int(r), size) for r in rows]


def tile_name(x: int, y: int) -> str:
    """``tiles/x<X>_y<Y>.png``: the PNG of the tile at level-0 (x, y)."""
    return f"tiles/x{int(x)}_y{int(y)}.png"


def save_png(out_dir: Path, x: int, y: int, tile: np.ndarray) -> str:
    """Write one tile under ``out_dir/tiles``; returns its path relative to ``out_dir``."""
    from PIL import Image

    rel = tile_name(x, y)
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tile).save(path)
    return rel
