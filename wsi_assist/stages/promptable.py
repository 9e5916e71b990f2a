"""Promptable segmenters in the ``submodels`` stage: prompts from a sub-model already
stored for the slide (points, or box centres; e.g. the built-in nuclei), the tiles that
hold prompts streamed once, one outline per prompt stored as QuPath detections in
``findings/<name>.geojson`` (passed through to ``annotations.geojson``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from wsi_assist import geojson
from wsi_assist.errors import WsiAssistError
from wsi_assist.models.promptable import (
    Outline,
    PromptableSubmodel,
    Prompts,
    assign_prompts,
    get_promptable,
    run_promptable,
)
from wsi_assist.models.scores import evaluate
from wsi_assist.models.submodel_spec import PromptSpec
from wsi_assist.models.submodels import choose_providers, resolve_spec_path, select_rows
from wsi_assist.settings import SubmodelParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import (
    SUB_BOXES,
    SUB_LABELS,
    SUB_MEASUREMENTS,
    SUB_POINTS,
    SUB_POLYGON_OFFSETS,
    SUB_POLYGONS,
    SUB_SCORES,
    SlideStore,
)
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

MEASUREMENTS = ("Area µm^2", "IoU prediction")


def run(slide: SlideContext, grid: TileGrid, background: str | None, entry: str,
        submodels: SubmodelParams) -> dict[str, Any]:
    """One promptable segmenter over the slide; its summary by name."""
    m = get_promptable(resolve_spec_path(entry), choose_providers(submodels.providers,
                                                                  slide.device))
    store, name = slide.store, m.spec.name
    want = m.spec.input.background
    why = None
    if want != "any" and background is not None and background != want:
        why = f"needs a {want} background (bright-field); this slide's is {background}"
    source = _source(store, m)
    if why is None and source.skipped:
        why = f"its prompts' source {source.name!r} was not run: {source.skipped}"
    if why is not None:
        store.write_submodel(name, {}, {**_attrs(m), "counts": {}, "scores": {},
                                        "skipped": why})
        log.info("%s: sub-model %s not run: %s", slide.slide_id, name, why)
        return {name: {"skipped": why}}
    prompts = read_prompts(source, m, grid)
    zs = store.read_zeroshot()
    sel = select_rows(m.spec, len(grid), None if zs is None else zs.classes,
                      None if zs is None else zs.top)
    rows = np.array(sorted(r for r in prompts.by_row if sel[r]), np.int64)
    outlines: list[Outline] = []
    if len(rows):
        part = dataclasses.replace(grid, coords=grid.coords[rows],
                                   tissue_fraction=grid.tissue_fraction[rows])
        halo = math.ceil(_prompt_spec(m).halo_um / grid.delivered_mpp)
        haloed, block_of = part.blocks(1, halo)  # each tile with context around it
        keys = np.empty(len(haloed), np.int64)
        keys[block_of] = rows
        outlines = run_promptable(slide.stream(haloed), haloed, keys, m, prompts,
                                  submodels.mpp_tolerance)
    return {name: _store(store, grid, m, prompts, rows, outlines)}


def _prompt_spec(m: PromptableSubmodel) -> PromptSpec:
    if m.spec.prompts is None:  # load_spec refuses such a spec; a hand-built one may lack it
        raise WsiAssistError(f"sub-model {m.spec.name!r}: a promptable segmenter needs "
                             f"'prompts' in its spec")
    return m.spec.prompts


def _source(store: SlideStore, m: PromptableSubmodel) -> Any:
    source = _prompt_spec(m).source
    try:
        return store.read_submodel(source)
    except KeyError as e:
        raise WsiAssistError(f"sub-model {m.spec.name!r}: prompts.source {source!r} has no "
                             f"findings for this slide; list it in submodels.specs "
                             f"({e.args[0]})") from None


def read_prompts(source: Any, m: PromptableSubmodel, grid: TileGrid) -> Prompts:
    """The source's detections (points, or box centres) of the listed classes, by tile."""
    p = _prompt_spec(m)
    g = source.arrays
    if SUB_POINTS in g:
        points = np.asarray(g[SUB_POINTS][...], np.float64)
    elif SUB_BOXES in g:
        b = np.asarray(g[SUB_BOXES][...], np.float64)
        points = (b[:, :2] + b[:, 2:]) / 2
    else:
        raise WsiAssistError(f"sub-model {m.spec.name!r}: prompts.source {source.name!r} "
                             f"stores no points or boxes (task {source.task})")
    labels = (np.asarray(g[SUB_LABELS][...], np.int64) if SUB_LABELS in g
              else np.zeros(len(points), np.int64))
    names = [source.color(int(k))[0] for k in labels]
    keep = np.isfinite(points).all(axis=1)
    if p.classes is not None:
        unknown = [c for c in p.classes if c not in source.classes]
        if unknown:
            raise WsiAssistError(f"sub-model {m.spec.name!r}: prompts.classes names "
                                 f"{unknown[0]!r}, not a class of {source.name!r}; valid: "
                                 f"{list(source.classes)}")
        keep &= np.isin(np.array(names, dtype=object), list(p.classes))
    scores = np.asarray(g[SUB_SCORES][...], np.float64) if SUB_SCORES in g else None
    idx = np.flatnonzero(keep)
    return assign_prompts(grid, points[idx], [names[i] for i in idx],
                          None if scores is None else scores[idx], p.max_per_tile)


def _arrays(prompts: Prompts, outlines: list[Outline], um2: float) -> dict[str, np.ndarray]:
    """Outlines as the store keeps nuclei (prompt points, outer rings, measurements), for
    the report's pictures; ``annotations.geojson`` takes them from the findings file."""
    rings = [np.asarray(x.polygon.exterior.coords, np.float64)[:-1] for x in outlines]
    offsets = np.zeros(len(rings) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rings])
    return {SUB_POINTS: prompts.points[[x.prompt for x in outlines]].reshape(-1, 2),
            SUB_LABELS: np.zeros(len(outlines), np.int16),
            SUB_MEASUREMENTS: np.array([[x.polygon.area * um2, x.iou] for x in outlines],
                                       np.float32).reshape(-1, len(MEASUREMENTS)),
            SUB_POLYGONS: np.concatenate(rings) if rings else np.zeros((0, 2)),
            SUB_POLYGON_OFFSETS: offsets}


def _attrs(m: PromptableSubmodel) -> dict[str, Any]:
    o, p = m.spec.output, m.spec.prompts
    return {"task": m.spec.task, "classes": list(o.classes),
            "colors": [list(c) for c in o.colors], "model_path": str(m.spec.model_path),
            "model_sha256": m.sha256, "encoder_path": str(m.spec.encoder_path),
            "encoder_sha256": m.encoder.sha256, "spec_path": str(m.spec.spec_path or ""),
            "prompt_source": p.source if p else None, "simplify_um": o.simplify_um}


def _store(store: SlideStore, grid: TileGrid, m: PromptableSubmodel, prompts: Prompts,
           rows: np.ndarray, outlines: list[Outline]) -> dict[str, Any]:
    o = m.spec.output
    counts = {c: 0 for c in o.classes}
    counts[o.classes[0]] = len(outlines)
    area_mm2 = float(grid.tissue_fraction[rows].sum()) * grid.cell_area_mm2
    scores = {k: evaluate(s, counts, area_mm2) for k, s in m.spec.scores.items()}
    path = store.findings_path(m.spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    um2 = grid.mpp ** 2
    meta = {"sub-model": m.spec.name, "prompt source": m.spec.prompts.source
            if m.spec.prompts else ""}
    feats = (geojson.feature(
        x.polygon, "detection", classification=(o.classes[0], o.colors[0]),
        measurements=dict(zip(MEASUREMENTS, (x.polygon.area * um2, x.iou), strict=True)),
        metadata={**meta, "prompt class": prompts.names[x.prompt]}) for x in outlines)
    geojson.write_features(path, feats)
    n_prompts = int(sum(len(v) for v in prompts.by_row.values()))
    method = (f"Promptable segmentation (SAM-style): one point prompt per "
              f"{_prompt_spec(m).source} detection ({n_prompts} prompts in {len(rows)} "
              f"tiles, each read with a {_prompt_spec(m).halo_um:g} µm halo); each outline is the predicted mask's part under its prompt, "
              f"simplified to {o.simplify_um:g} µm; QuPath detections in annotations.geojson")
    attrs = {**_attrs(m), "counts": counts, "scores": scores, "n_tiles_run": len(rows),
             "method": method,
             "analysed_area_mm2": area_mm2,
             "n_prompts": n_prompts,
             "geojson": path.relative_to(store.folder).as_posix()}
    store.write_submodel(m.spec.name, _arrays(prompts, outlines, um2), attrs, array_attrs={
        SUB_MEASUREMENTS: {"measurement_names": list(MEASUREMENTS)},
        SUB_POLYGONS: {"description": "outer ring vertices, level-0 x, y; outline i is rows "
                                      "polygon_offsets[i]:polygon_offsets[i + 1] (holes "
                                      "are in the findings GeoJSON)"}})
    return {"counts": counts, "scores": {k: v["value"] for k, v in scores.items()}}
