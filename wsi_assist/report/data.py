"""The sections of ``report.json``, built from what the stages stored.

Everything here reads store records; no model and no slide file is needed. The report
is a plain dict with a versioned schema (``SCHEMA``, ``SCHEMA_VERSION``).
"""

from __future__ import annotations

import datetime as dt
import logging
from importlib import metadata
from typing import Any

import numpy as np

from wsi_assist.aggregate import ClassRegion
from wsi_assist.slide import finite_float
from wsi_assist.stain import KIND_LABELS
from wsi_assist.store import Embeddings, SlideRecord, SlideStore, SubmodelRecord, ZeroShot
from wsi_assist.tiling import TileGrid
from wsi_assist.tissue import warnings as tissue_warnings

log = logging.getLogger(__name__)

SCHEMA = "wsi-assist/report"
SCHEMA_VERSION = "1.1"
NOTICE = "Draft for research use; not a diagnosis"
DAMAGED_DEFINITION = ("tiles whose compressed image data is damaged (cut short, a stray "
                      "marker or a hole) but decodable; their pixels may be wrong")

PACKAGES = ("wsi-assist", "numpy", "zarr", "shapely", "pillow", "tiffslide", "torch",
            "open_clip_torch", "transformers", "onnxruntime", "onnxruntime-gpu")


def qc(store: SlideStore, grid: TileGrid | None, empty_below: float) -> dict[str, Any]:
    """Tissue area and how it was found, tile count, the fraction of tiles mostly empty of
    tissue, and ``warnings`` a reader must see (no tissue found)."""
    tissue = store.read_tissue()
    warnings = tissue_warnings(tissue.geometry) if tissue.area_um2 is not None else []
    warnings += [str(w) for s in store.read_submodels()
                 for w in (s.attrs.get("warnings") or [])]
    n = None if grid is None else len(grid)
    empty = None
    if grid is not None and n:
        empty = float((grid.tissue_fraction.astype(np.float64) < empty_below).mean())
    return {"tissue_area_mm2": None if tissue.area_um2 is None else tissue.area_um2 / 1e6,
            "n_tiles": n, "empty_tile_fraction": empty,
            "empty_tile_definition": f"tiles less than {empty_below:.0%} covered by tissue",
            "tissue_background": tissue.background, "tissue_method": tissue.method,
            "tissue_threshold": finite_float(tissue.threshold), "warnings": warnings,
            "damaged_tiles": store.read_damaged_tiles(),
            "damaged_tile_definition": DAMAGED_DEFINITION}


def stain(store: SlideStore) -> dict[str, Any] | None:
    """The slide's kind of image and stain vectors (None before the tissue stage found
    them): kind, names, vectors, background, source, the reason when defaults were used,
    a plain-words label, and per stain its vector, the angle to its default and the colour
    it gives at OD 1 (for a swatch)."""
    found = store.read_stains()
    if found is None:
        return None
    out = found.to_json()
    bright = found.kind != "fluorescence"
    angles = found.angles_to_default() if bright else []
    stains = []
    for i in range(2 if bright else 0):  # the residual is no stain
        v = found.matrix[i]
        rgb = [int(np.clip(round(b * 10 ** -float(c)), 0, 255))
               for b, c in zip(found.background, v, strict=True)]
        stains.append({"name": found.names[i], "vector": v.round(5).tolist(),
                       "angle_to_default_deg": angles[i], "color": rgb})
    out.update(label=found.label, kind_label=KIND_LABELS[found.kind], stains=stains)
    return out


def composition(zs: ZeroShot | None, regions: list[ClassRegion]) -> dict[str, Any] | None:
    """Per class: tiles, area and fraction (from the zero-shot stage) and region area."""
    if zs is None:
        return None
    by_name = {r.name: r for r in regions}
    n = len(zs.top)
    rows = []
    for k, (name, color) in enumerate(zip(zs.classes, zs.colors, strict=True)):
        c = zs.composition.get(name, {})
        r = by_name.get(name)
        n_k = int(c.get("n_tiles", int((zs.top == k).sum())))
        rows.append({"name": name, "color": list(color), "n_tiles": n_k,
                     "area_mm2": finite_float(c.get("area_mm2")),
                     "fraction": finite_float(c.get("fraction", n_k / n if n else None)),
                     "region_area_mm2": None if r is None else r.area_mm2,
                     "region_fraction": None if r is None else r.fraction})
    return {"prompt_set": zs.prompt_set, "threshold": zs.threshold,
            "n_uncertain": int(zs.uncertain.sum()), "classes": rows}


def submodel_findings(subs: list[SubmodelRecord]) -> list[dict[str, Any]]:
    """Counts and scores (with their definitions) of each sub-model; a score that does
    not apply to the slide has no value and says why (``not_applicable``). The built-in
    nucleus analysis adds the parameters it ran with (QuPath's names) and its stains."""
    out = []
    for s in subs:
        scores = {k: _score(v) for k, v in (s.attrs.get("scores") or {}).items()}
        out.append({"name": s.name, "task": s.task, "classes": s.classes,
                    "colors": s.attrs.get("colors", []),
                    "counts": {k: int(v) for k, v in (s.attrs.get("counts") or {}).items()},
                    "scores": scores, "model_path": s.attrs.get("model_path"),
                    "model_sha256": s.attrs.get("model_sha256"), "skipped": s.skipped,
                    "method": s.attrs.get("method"),
                    # a skipped analysis ran with no parameters worth printing
                    "parameters": {} if s.skipped else dict(s.attrs.get("parameters") or {}),
                    "stains": None if s.skipped else s.attrs.get("stains"),
                    "intensity_counts": s.attrs.get("intensity_counts")})
    return out


def _score(v: dict[str, Any]) -> dict[str, Any]:
    """A stored score for the report: its value (a category stays a string), definition,
    why it does not apply; a categorical one adds its rules, the one met and the
    percentages they were judged on."""
    value = v.get("value")
    out = {"value": value if isinstance(value, str) else finite_float(value),
           "definition": str(v.get("definition", "")), "kind": v.get("kind"),
           "not_applicable": v.get("not_applicable") or None}
    if v.get("rules"):
        out.update({"rules": list(v["rules"]), "rule": v.get("rule"), "met": v.get("met"),
                    "percent": dict(v.get("percent") or {})})
    return out


def stage_statuses(stages: dict[str, dict[str, str]], findings: list[dict[str, Any]]
                   ) -> dict[str, dict[str, str]]:
    """``stages`` with ``submodels`` "not applicable", and why, when it ran but every
    analysis it holds was skipped as unsuited to the slide (the built-in nuclei on a
    fluorescence slide): "done" would claim findings that do not exist."""
    sub = stages.get("submodels")
    skipped = [f for f in findings if f.get("skipped")]
    if sub is None or sub.get("status") != "done" or not findings \
            or len(skipped) != len(findings):
        return stages
    why = "; ".join(f"{f['name']}: {f['skipped']}" for f in skipped)
    return {**stages, "submodels": {
        "status": "not applicable", "reason": why,
        "how_to_enable": "nothing to enable: these analyses do not apply to this slide"}}


def provenance(emb: Embeddings | None, zs: ZeroShot | None, subs: list[SubmodelRecord],
               captions: list[dict[str, Any]] | None, config_hash: str,
               version: str | None, seconds: dict[str, float] | None,
               device: str | None = None) -> dict[str, Any]:
    """Model ids and checksums, prompt set hash, config hash, package versions, times,
    the device the models ran on."""
    models: list[dict[str, Any]] = []
    if emb is not None:
        models.append({"role": "embedding", "model": emb.model, "sha256": emb.model_sha256})
    if zs is not None:
        models.append({"role": "zero-shot", "model": zs.model, "prompt_set": zs.prompt_set,
                       "prompt_sha256": zs.prompt_sha256})
    for s in subs:
        models.append({"role": f"sub-model {s.name}", "model": s.attrs.get("model_path"),
                       "sha256": s.attrs.get("model_sha256")})
        if s.attrs.get("encoder_path"):  # a promptable segmenter's image encoder
            models.append({"role": f"sub-model {s.name} encoder",
                           "model": s.attrs.get("encoder_path"),
                           "sha256": s.attrs.get("encoder_sha256")})
    cap_models = sorted({str(c.get("model")) for c in captions or [] if c.get("model")})
    for m in cap_models:
        models.append({"role": "captioner", "model": m})
    return {"models": models, "config_sha256": config_hash,
            "packages": package_versions(), "wsi_assist_version": version,
            "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stage_seconds": seconds, "device": device}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def slide_section(slide: SlideRecord, grid: TileGrid | None, slide_id: str,
                  info: dict[str, Any] | None) -> dict[str, Any]:
    info = info or {}
    keys = ("level", "level_downsample", "read_px", "stride_px", "tile_px", "target_mpp",
            "delivered_mpp")
    attrs = {} if grid is None else grid.attrs()
    return {"slide_id": slide_id, "path": slide.path or info.get("path"),
            "mpp": finite_float(slide.mpp if slide.mpp is not None else info.get("mpp")),
            "mpp_source": slide.mpp_source or info.get("mpp_source"),
            "synthetic": slide.synthetic or bool(info.get("synthetic", False)),
            "width": info.get("width"), "height": info.get("height"),
            "vendor": info.get("vendor"), "format": info.get("format"),
            "objective_power": info.get("objective_power"),
            "layout": info.get("layout") or slide.layout,
            "channels": list(info.get("channels") or slide.channels),
            "grid": {k: attrs.get(k) for k in keys}}
