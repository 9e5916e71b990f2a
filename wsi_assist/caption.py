"""Captions of representative tiles, for the ``caption`` stage: which tiles, what each
tile's prompt carries (its findings, PathAsst-style), the cache, and the records of
``captions.json``. Captions are cached in ``OUT/.cache/captions/<slide-id>.json`` keyed by
model, prompt, slide fingerprint and tile coordinates, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist import files
from wsi_assist.errors import StageSkipped
from wsi_assist.represent import Pick
from wsi_assist.settings import CaptionParams
from wsi_assist.store import (
    SUB_BOXES,
    SUB_LABELS,
    SUB_POINTS,
    SUB_PROBS,
    Embeddings,
    SubmodelRecord,
    ZeroShot,
)
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


def cache_file(out_root: Path, slide_id: str) -> Path:
    """``OUT/.cache/captions/<slide_id>.json`` for the output folder ``out_root``."""
    return out_root / ".cache" / "captions" / f"{slide_id}.json"


def cache_key(model: str, prompt: str, fingerprint: str, xy: tuple[int, int],
              extra: dict[str, Any]) -> str:
    blob = json.dumps([model, prompt, fingerprint, list(xy), extra], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path) -> dict[str, Any]:
    """The caption cache at ``path``; empty when absent or unreadable."""
    data = files.read_json(path, left_out_of="the caption cache (it is rebuilt)")
    return data if isinstance(data, dict) else {}


def choose(grid: TileGrid, params: CaptionParams, emb: Embeddings | None,
           zs: ZeroShot | None) -> tuple[list[Pick], dict[str, Any]]:
    """Representative tiles (per class, else by tissue) plus query hits; and notes."""
    from wsi_assist import represent

    vectors = emb.vectors.astype(np.float32) if emb is not None else None
    notes: dict[str, Any] = {}
    if zs is not None:
        picks = represent.by_class(zs.probs, zs.classes, params.top_k, vectors, params.pool)
        notes["selection"] = "zero-shot class"
    else:
        picks = represent.by_tissue(grid.tissue_fraction, params.fallback_k, vectors,
                                    params.pool)
        notes["selection"] = "tissue fraction" + (" + embeddings" if emb is not None else "")
    if params.queries:
        if emb is None or vectors is None:
            notes["queries_skipped"] = "no embeddings in slide.zarr; run the 'embed' stage"
        else:
            spec = params.query_model or emb.model
            try:
                vecs = represent.encode_queries(spec, params.queries)
                picks += represent.by_query(vectors, params.queries, vecs, params.query_k)
            except StageSkipped as e:
                notes["queries_skipped"] = str(e)
                log.warning("caption: text queries not run: %s", e)
    return represent.unique(picks), notes


def tile_findings(grid: TileGrid, rows: Sequence[int], zs: ZeroShot | None,
                  subs: Sequence[SubmodelRecord]) -> list[dict[str, Any]]:
    """Per chosen tile: zero-shot class/prob (and runner-up) and sub-model results."""
    out: list[dict[str, Any]] = [{"submodels": {}} for _ in rows]
    rows_a = np.asarray(rows, dtype=np.int64)
    if zs is not None:
        for f, p in zip(out, zs.probs[rows_a]):
            order = np.argsort(-p)
            f["class"], f["prob"] = zs.classes[order[0]], float(p[order[0]])
            if len(order) > 1:
                f["second"] = (zs.classes[order[1]], float(p[order[1]]))
    for sub in subs:
        for f, res in zip(out, _submodel_rows(sub, grid, rows_a)):
            if res:
                f["submodels"][sub.name] = res
    return out


def _submodel_rows(sub: SubmodelRecord, grid: TileGrid, rows: np.ndarray
                   ) -> list[dict[str, Any]]:
    """One sub-model's result for each tile in ``rows`` (counts inside the tile, or its
    tile-classification label)."""
    classes = sub.classes
    name_of = (lambda i: classes[i] if 0 <= i < len(classes) else str(i))
    if sub.task == "tile-classification" and SUB_PROBS in sub.arrays:
        probs, labels = sub.read(SUB_PROBS, rows), sub.read(SUB_LABELS, rows)
        return [{"label": name_of(int(label)), "prob": float(p[label])}
                for p, label in zip(probs, labels)]
    if sub.task in ("point-detection", "nucleus-detection") and SUB_POINTS in sub.arrays:
        xy = sub.read(SUB_POINTS).astype(np.float64).reshape(-1, 2)
    elif sub.task == "box-detection" and SUB_BOXES in sub.arrays:
        b = sub.read(SUB_BOXES).astype(np.float64).reshape(-1, 4)
        xy = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    else:
        return [{} for _ in rows]
    labels = sub.read(SUB_LABELS).astype(np.int64)
    s = grid.size_l0
    res = []
    for r in rows:
        x0, y0 = grid.coords[r]
        inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + s)
                  & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + s))
        counts = {c: 0 for c in classes} if classes else {"objects": 0}
        for i in labels[inside]:
            key = name_of(int(i)) if classes else "objects"
            counts[key] = counts.get(key, 0) + 1
        res.append({"counts": counts})
    return res


def generate(model: str, device: str, params: CaptionParams, tiles: list[np.ndarray],
             prompts: list[str], keys: list[str], cache: dict[str, Any]) -> None:
    """Caption the cache misses with ``model`` and add them to ``cache``."""
    from wsi_assist.models.captioner import Captioner

    cap = Captioner(model, device, params.dtype)
    for key, c in zip(keys, cap.caption(tiles, prompts, params.max_new_tokens,
                                        params.batch_size)):
        cache[key] = {"caption": c.text, "n_tokens": c.n_tokens}


def record(pick: Pick, findings: dict[str, Any], grid: TileGrid, png: str, prompt: str,
           cached: dict[str, Any], model: str | None) -> dict[str, Any]:
    """One entry of ``captions.json``."""
    x, y = (int(v) for v in grid.coords[pick.row])
    return {"x": x, "y": y, "size_l0": grid.size_l0, "tile_png": png,
            "class": findings.get("class", pick.reason), "prob": findings.get("prob"),
            "reason": pick.reason, "score": pick.score, "caption": cached["caption"],
            "n_tokens": cached.get("n_tokens"), "model": model, "prompt": prompt,
            "findings": findings}
