"""The ``submodels`` stage: the built-in nucleus analysis (``nuclei`` in
``submodels.specs``, see :mod:`wsi_assist.stages.nuclei`) and every configured ONNX
sub-model over the slide's tiles, read once for all ONNX models; findings stored per
model (detections de-duplicated across tile borders, slide scores from class counts,
segmentation polygons in ``findings/``). The built-in reads the tiles again, each with a
halo around it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from wsi_assist import geojson
from wsi_assist.models.promptable import get_promptable
from wsi_assist.models.submodel_decode import Accumulator
from wsi_assist.models.submodel_spec import load_spec
from wsi_assist.models.submodels import (
    Submodel,
    choose_providers,
    get_submodel,
    resolve_spec_path,
    run_models,
    select_rows,
)
from wsi_assist.settings import BUILTIN_NUCLEI, LEGACY_NUCLEI, NucleiParams, SubmodelParams
from wsi_assist.stages import nuclei as builtin
from wsi_assist.stages import promptable
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import SUB_MEASUREMENTS, SlideStore
from wsi_assist.tiling import TileGrid

PROMPTABLE = "promptable-segmentation"

log = logging.getLogger(__name__)


def configured(store: SlideStore, submodels: SubmodelParams, nuclei: NucleiParams) -> bool:
    """At least one sub-model spec is listed."""
    return bool(submodels.specs)


def check(submodels: SubmodelParams, nuclei: NucleiParams) -> None:
    """Every listed spec reads, and its model loads and agrees with it (on the CPU); the
    built-in nucleus analysis needs no file."""
    for entry in submodels.specs:
        if is_promptable(entry):
            get_promptable(resolve_spec_path(entry), ["CPUExecutionProvider"])
        elif not is_builtin(entry):
            get_submodel(resolve_spec_path(entry), ["CPUExecutionProvider"])


def is_builtin(entry: str) -> bool:
    """Whether a ``submodels.specs`` entry names the built-in nucleus analysis."""
    return entry in (BUILTIN_NUCLEI, LEGACY_NUCLEI)


def is_promptable(entry: str) -> bool:
    """Whether a ``submodels.specs`` entry is a promptable segmenter (SAM-style)."""
    return not is_builtin(entry) and load_spec(resolve_spec_path(entry)).task == PROMPTABLE


def run(slide: SlideContext, submodels: SubmodelParams, nuclei: NucleiParams
        ) -> dict[str, Any]:
    """Run the analyses whose input suits the slide; store each one's findings."""
    store = slide.store
    grid = store.read_grid()
    background = store.read_tissue().background
    summary: dict[str, Any] = {}
    if any(is_builtin(s) for s in submodels.specs):
        summary[builtin.NAME] = _run_builtin(slide, grid, background, nuclei)
    prompted = [s for s in submodels.specs if is_promptable(s)]
    onnx = [s for s in submodels.specs if not is_builtin(s) and s not in prompted]
    if onnx:
        summary.update(_run_onnx(slide, grid, background, onnx, submodels))
    for entry in prompted:  # after the models whose detections prompt them
        summary.update(promptable.run(slide, grid, background, entry, submodels))
    warnings = [w for r in summary.values() if isinstance(r, dict)
                for w in r.get("warnings", [])]
    if warnings:  # what the manifest's warnings column shows
        summary["warnings"] = warnings
    return summary


def _run_builtin(slide: SlideContext, grid: TileGrid, background: str | None,
                 params: NucleiParams) -> dict[str, Any]:
    store = slide.store
    stains = builtin.slide_stains(store, params.stains)
    if background == "dark" or stains.kind == "fluorescence":
        what = "fluorescence" if stains.kind == "fluorescence" else "dark (fluorescence)"
        return builtin.skip(store, stains, params, "needs a bright-field slide (nuclei are "
                            f"found on optical density); this slide's background is {what}")
    blocks, block_of = builtin.analysis_grid(grid, params)
    return builtin.run(store, grid, slide.stream(blocks, batch_size=builtin.BATCH), blocks,
                       block_of, stains, params, slide.info.level_dimensions[grid.level])


def _run_onnx(slide: SlideContext, grid: TileGrid, background: str | None,
              specs: list[str], submodels: SubmodelParams) -> dict[str, Any]:
    providers = choose_providers(submodels.providers, slide.device)
    models = [get_submodel(resolve_spec_path(s), providers) for s in specs]
    store = slide.store
    zs = store.read_zeroshot()
    active, summary = [], {}
    for m in models:
        want = m.spec.input.background
        if want != "any" and background is not None and background != want:
            why = f"needs a {want} background (bright-field); this slide's is {background}"
            store.write_submodel(m.spec.name, {}, {**_base_attrs(m), "counts": {},
                                                  "scores": {}, "skipped": why})
            summary[m.spec.name] = {"skipped": why}
            log.info("%s: sub-model %s not run: %s", slide.slide_id, m.spec.name, why)
            continue
        sel = select_rows(m.spec, len(grid), None if zs is None else zs.classes,
                          None if zs is None else zs.top)
        active.append((m, sel))
    if not active:
        return summary
    union = np.logical_or.reduce([sel for _, sel in active])
    rows = np.flatnonzero(union)
    part = dataclasses.replace(grid, coords=grid.coords[rows],
                               tissue_fraction=grid.tissue_fraction[rows])
    accs = run_models(slide.stream(part), grid, rows, active, submodels.mpp_tolerance)
    for (m, sel), acc in zip(active, accs, strict=True):
        summary[m.spec.name] = _store(slide, grid, m, sel, acc)
    return summary


def _base_attrs(m: Submodel) -> dict[str, Any]:
    o = m.spec.output
    return {"task": m.spec.task, "classes": list(o.classes),
            "colors": [list(c) for c in o.colors], "model_path": str(m.spec.model_path),
            "model_sha256": m.sha256, "spec_path": str(m.spec.spec_path or "")}


def _store(slide: SlideContext, grid: TileGrid, m: Submodel, sel: np.ndarray,
           acc: Accumulator) -> dict[str, Any]:
    area_mm2 = float(grid.tissue_fraction[sel].sum()) * grid.cell_area_mm2
    arrays, attrs = acc.finish(area_mm2)
    o = m.spec.output
    attrs.update(_base_attrs(m))
    attrs.update({"n_tiles_run": int(sel.sum()), "analysed_area_mm2": area_mm2})
    if m.spec.task == "segmentation":
        attrs["geojson"] = _write_segmentation(slide.store, m, acc)
        attrs["simplify_um"] = o.simplify_um
        attrs["method"] = (f"Segmentation masks per class merged across tile borders "
                           f"(shapely union), simplified to {o.simplify_um:g} µm, polygons "
                           f"under {o.min_area_um2:g} µm² dropped; QuPath annotations in "
                           f"annotations.geojson")
    slide.store.write_submodel(
        m.spec.name, arrays, attrs,
        array_attrs={SUB_MEASUREMENTS: {"measurement_names": list(o.measurement_names)}})
    return {"counts": attrs["counts"],
            "scores": {k: v["value"] for k, v in attrs["scores"].items()}}


def _write_segmentation(store: SlideStore, m: Submodel, acc: Accumulator) -> str:
    """``findings/<name>.geojson``: one QuPath annotation per merged polygon."""
    o = m.spec.output
    path = store.findings_path(m.spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    um2 = acc.mpp ** 2
    feats = (geojson.feature(poly, "annotation", classification=(o.classes[c], o.colors[c]),
                             measurements={"Area px^2": poly.area, "Area µm^2": poly.area * um2},
                             name=o.classes[c], metadata={"sub-model": m.spec.name})
             for c, mp in sorted(acc.merged.items()) for poly in mp.geoms)
    geojson.write_features(path, feats)
    return path.relative_to(store.folder).as_posix()
