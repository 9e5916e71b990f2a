"""The ``caption`` stage: representative tiles, their captions, and the draft summary.

Outputs in the slide folder: ``tiles/*.png``, ``captions.json`` (list of {x, y, tile_png,
class, prob, caption, model, prompt, ...}) and ``summary.json``. Captions are cached in
``OUT/.cache/captions/<slide-id>.json`` keyed by model, prompt, slide fingerprint and
tile coordinates, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from wsi_assist.errors import StageSkipped
from wsi_assist.models.captioner import DEFAULT_PROMPT, build_prompt
from wsi_assist.represent import Pick
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

ENABLE_HINT = ("no captioner configured; set caption.model to a folder saved with "
               "save_pretrained or a hub id of an image-text-to-text model (LLaVA, "
               "Qwen2-VL, ...) to caption representative tiles")


@dataclass(frozen=True)
class CaptionParams:
    """Captions and slide summary (config section ``caption``)."""

    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 96
    batch_size: int = 4
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    top_k: int = 3
    pool: int = 32
    fallback_k: int = 8
    queries: list[str] = field(default_factory=list)
    query_k: int = 3
    query_model: str | None = None
    summary_model: str | None = None
    summary_max_new_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "pool", "summary_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("top_k", "fallback_k", "query_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if any(not q.strip() for q in self.queries):
            raise ValueError(f"queries must be non-empty texts, got {self.queries!r}")


def cache_file(out_root: Path, slide_id: str) -> Path:
    """``OUT/.cache/captions/<slide_id>.json`` for the output folder ``out_root``."""
    return out_root / ".cache" / "captions" / f"{slide_id}.json"


def cache_key(model: str, prompt: str, fingerprint: str, xy: tuple[int, int],
              extra: dict[str, Any]) -> str:
    blob = json.dumps([model, prompt, fingerprint, list(xy), extra], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable caption cache %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _array(group: zarr.Group, name: str) -> np.ndarray | None:
    return np.asarray(group[name][...]) if name in group else None


def choose(group: zarr.Group, grid: TileGrid, params: CaptionParams
           ) -> tuple[list[Pick], dict[str, Any]]:
    """Representative tiles (per class, else by tissue) plus query hits; and notes."""
    from wsi_assist import represent

    emb = _array(group, "embeddings")
    emb = emb.astype(np.float32) if emb is not None else None
    notes: dict[str, Any] = {}
    probs = _array(group, "zeroshot/probs")
    if probs is not None:
        classes = list(group["zeroshot"].attrs["classes"])
        picks = represent.by_class(probs, classes, params.top_k, emb, params.pool)
        notes["selection"] = "zero-shot class"
    else:
        picks = represent.by_tissue(grid.tissue_fraction, params.fallback_k, emb, params.pool)
        notes["selection"] = "tissue fraction" + (" + embeddings" if emb is not None else "")
    if params.queries:
        if emb is None:
            notes["queries_skipped"] = "no embeddings in slide.zarr; run the 'embed' stage"
        else:
            spec = params.query_model or str(group["embeddings"].attrs.get("model", ""))
            try:
                vecs = represent.encode_queries(spec, params.queries)
                picks += represent.by_query(emb, params.queries, vecs, params.query_k)
            except StageSkipped as e:
                notes["queries_skipped"] = str(e)
                log.warning("caption: text queries not run: %s", e)
    return represent.unique(picks), notes


def tile_findings(group: zarr.Group, grid: TileGrid, rows: Sequence[int]
                  ) -> list[dict[str, Any]]:
    """Per chosen tile: zero-shot class/prob (and runner-up) and sub-model results."""
    out: list[dict[str, Any]] = [{"submodels": {}} for _ in rows]
    rows_a = np.asarray(rows, dtype=np.int64)
    if "zeroshot/probs" in group:
        classes = list(group["zeroshot"].attrs["classes"])
        for f, p in zip(out, group["zeroshot/probs"].oindex[rows_a]):
            order = np.argsort(-p)
            f["class"], f["prob"] = classes[order[0]], float(p[order[0]])
            if len(order) > 1:
                f["second"] = (classes[order[1]], float(p[order[1]]))
    if "submodels" in group:
        for name, sub in group["submodels"].groups():
            for f, res in zip(out, _submodel_rows(sub, grid, rows_a)):
                if res:
                    f["submodels"][name] = res
    return out


def _submodel_rows(sub: zarr.Group, grid: TileGrid, rows: np.ndarray
                   ) -> list[dict[str, Any]]:
    """One sub-model's result for each tile in ``rows`` (counts inside the tile, or its
    tile-classification label)."""
    classes = list(sub.attrs.get("classes", []))
    name_of = (lambda i: classes[i] if 0 <= i < len(classes) else str(i))
    task = sub.attrs.get("task")
    if task == "tile-classification" and "probs" in sub:
        probs, labels = sub["probs"].oindex[rows], sub["labels"].oindex[rows]
        return [{"label": name_of(int(label)), "prob": float(p[label])}
                for p, label in zip(probs, labels)]
    if task == "point-detection" and "points" in sub:
        xy = np.asarray(sub["points"][...], dtype=np.float64).reshape(-1, 2)
    elif task == "box-detection" and "boxes" in sub:
        b = np.asarray(sub["boxes"][...], dtype=np.float64).reshape(-1, 4)
        xy = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    else:
        return [{} for _ in rows]
    labels = np.asarray(sub["labels"][...], dtype=np.int64)
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


def run_caption(run: Any) -> dict[str, Any]:
    """Stage: caption representative tiles (cached), save their PNGs, draft a summary."""
    from wsi_assist import batch, represent  # batch imports pipeline, which imports us

    params: CaptionParams = run.config.caption
    if params.model is None:
        raise StageSkipped(ENABLE_HINT)
    grid = run.read_grid()
    picks, notes = choose(run.store, grid, params)
    rows = [p.row for p in picks]
    fingerprint = run.store.attrs.get("slide_fingerprint")
    if not fingerprint:  # a batch stores it before the stages run
        fingerprint = batch.slide_fingerprint(run.path)
        run.store.attrs["slide_fingerprint"] = fingerprint
    findings = tile_findings(run.store, grid, rows)
    prompts = [build_prompt(params.prompt, f) for f in findings]
    extra = {"max_new_tokens": params.max_new_tokens, "tile_px": grid.tile_px,
             "mpp": grid.delivered_mpp}
    keys = [cache_key(params.model, pr, fingerprint, tuple(map(int, grid.coords[r])), extra)
            for pr, r in zip(prompts, rows)]
    cpath = cache_file(run.out_root if run.out_root is not None else run.out_dir.parent,
                       run.slide_id)
    cache = load_cache(cpath)
    with run.open_slide() as slide:
        tiles = represent.read_tiles(slide, grid, rows)
    pngs = [represent.save_png(run.out_dir, *grid.coords[r], t) for r, t in zip(rows, tiles)]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        _generate(run, params, [tiles[i] for i in todo], [prompts[i] for i in todo],
                  [keys[i] for i in todo], cache)
        save_json(cpath, cache)
    records = [_record(p, f, grid, png, pr, cache[k], params.model)
               for p, f, png, pr, k in zip(picks, findings, pngs, prompts, keys)]
    save_json(run.out_dir / "captions.json", records)
    doc = _summarise(run, params, records)
    return {"n_captions": len(records), "generated": len(todo),
            "cached": len(records) - len(todo), "summary": doc["provenance"]["method"],
            **notes}


def _generate(run: Any, params: CaptionParams, tiles: list[np.ndarray],
              prompts: list[str], keys: list[str], cache: dict[str, Any]) -> None:
    """Caption the cache misses with ``params.model`` and add them to ``cache``."""
    from wsi_assist.models.captioner import Captioner

    cap = Captioner(params.model, run.device, params.dtype)
    for key, c in zip(keys, cap.caption(tiles, prompts, params.max_new_tokens,
                                        params.batch_size)):
        cache[key] = {"caption": c.text, "n_tokens": c.n_tokens}


def _record(pick: Pick, findings: dict[str, Any], grid: TileGrid, png: str, prompt: str,
            cached: dict[str, Any], model: str | None) -> dict[str, Any]:
    x, y = (int(v) for v in grid.coords[pick.row])
    return {"x": x, "y": y, "size_l0": grid.size_l0, "tile_png": png,
            "class": findings.get("class", pick.reason), "prob": findings.get("prob"),
            "reason": pick.reason, "score": pick.score, "caption": cached["caption"],
            "n_tokens": cached.get("n_tokens"), "model": model, "prompt": prompt,
            "findings": findings}


def _summarise(run: Any, params: CaptionParams, records: list[dict[str, Any]]
               ) -> dict[str, Any]:
    from wsi_assist import summary

    found = summary.collect_findings(run.store)
    if params.summary_model:
        text = summary.llm_summary(params.summary_model, summary.llm_prompt(found, records),
                                   run.device, params.summary_max_new_tokens)
        method, model = "llm", params.summary_model
    else:
        text, method, model = summary.template_summary(found, records), "template", None
    return summary.write_summary(run.out_dir / "summary.json", text, method, model, found,
                                 len(records), params.model)
