"""The ``submodels`` stage: the built-in nucleus analysis (``nuclei`` in
``submodels.specs``, see :mod:`wsi_assist.stages.nuclei`) and every configured ONNX
sub-model over the slide's tiles, read once for all ONNX models; findings stored per
model (detections de-duplicated across tile borders, slide scores from class counts,
segmentation polygons in ``findings/``). The tiles come from the slide's one tile pass
(:mod:`wsi_assist.stages.tilepass`): the built-in reads them in haloed blocks, the ONNX
models tile by tile; those that run on some zero-shot classes only read theirs after it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
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
from wsi_assist.settings import (
    BUILTIN_NUCLEI,
    LEGACY_NUCLEI,
    ChannelParams,
    NucleiParams,
    SubmodelParams,
)
from wsi_assist.stages import nuclei as builtin
from wsi_assist.stages import promptable, tilepass
from wsi_assist.stages.context import SlideContext
from wsi_assist.stain import default_vectors
from wsi_assist.store import SUB_MEASUREMENTS, SlideStore
from wsi_assist.tiling import TileGrid

PROMPTABLE = "promptable-segmentation"

log = logging.getLogger(__name__)


def configured(store: SlideStore, submodels: SubmodelParams, nuclei: NucleiParams,
               channels: ChannelParams | None = None) -> bool:
    """At least one sub-model spec is listed."""
    return bool(submodels.specs)


def on_device(submodels: SubmodelParams, nuclei: NucleiParams,
              channels: ChannelParams | None = None) -> bool:
    """ONNX sub-models run with the device's providers; the built-in nuclei on the CPU."""
    return any(not is_builtin(entry) for entry in submodels.specs)


def check(submodels: SubmodelParams, nuclei: NucleiParams,
          channels: ChannelParams | None = None) -> None:
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


def run(slide: SlideContext, submodels: SubmodelParams, nuclei: NucleiParams,
        channels: ChannelParams | None = None) -> dict[str, Any]:
    """Run the analyses whose input suits the slide; store each one's findings."""
    return tilepass.run_alone(slide, open_pass(slide, submodels, nuclei, channels))


def open_pass(slide: SlideContext, submodels: SubmodelParams, nuclei: NucleiParams,
              channels: ChannelParams | None = None) -> tilepass.Planned:
    """The pass feeds the built-in nuclei (haloed blocks) and the ONNX sub-models that
    run on every tile; those run on zero-shot classes only, which the pass itself
    produces, read their tiles after it (in ``finish``)."""
    store = slide.store
    grid = store.read_grid()
    background = store.read_tissue().background
    consumers: list[tilepass.Consumer] = []
    steps: list[Callable[[], dict[str, Any]]] = []
    if any(is_builtin(s) for s in submodels.specs):
        steps.append(_open_builtin(slide, grid, background, nuclei, consumers,
                                   "auto" if channels is None else channels.nuclear))
    prompted = [s for s in submodels.specs if is_promptable(s)]
    onnx = [s for s in submodels.specs if not is_builtin(s) and s not in prompted]
    if onnx:
        steps.append(_open_onnx(slide, grid, background, onnx, submodels, consumers))

    def finish() -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for step in steps:
            summary.update(step())
        for entry in prompted:  # after the models whose detections prompt them
            if slide.info.multichannel:  # RGB models: none runs on fluorescence planes
                summary[entry] = {"skipped": _not_rgb(slide)}
                continue
            summary.update(promptable.run(slide, grid, background, entry, submodels))
        warnings = [w for r in summary.values() if isinstance(r, dict)
                    for w in r.get("warnings", [])]
        if warnings:  # what the manifest's warnings column shows
            summary["warnings"] = warnings
        return summary

    return tilepass.Planned(consumers, finish)


def _open_builtin(slide: SlideContext, grid: TileGrid, background: str | None,
                  params: NucleiParams, consumers: list[tilepass.Consumer],
                  nuclear: str | int = "auto") -> Callable[[], dict[str, Any]]:
    store = slide.store
    stains = builtin.slide_stains(store, params.stains)
    fl = None
    if builtin.is_fluorescence(slide, background, stains):
        # nuclei on the nuclear channel; no DAB scores (they say why)
        stains = stains if stains.kind == "fluorescence" else default_vectors("fluorescence")
        fl = builtin.fluorescence_setup(slide, params, nuclear)
    blocks, block_of = builtin.analysis_grid(grid, params)
    size = slide.info.level_dimensions[grid.level]
    c = tilepass.Consumer(
        "submodels", builtin.NAME,
        lambda b: builtin.analyse(b, grid, blocks, block_of, stains, params, size, fl),
        grid, builtin.BATCH, blocks=blocks, block_of=block_of)
    consumers.append(c)
    return lambda: {builtin.NAME: builtin.record(store, grid, c.result, blocks, stains,
                                                 params, fl)}


def _open_onnx(slide: SlideContext, grid: TileGrid, background: str | None,
               specs: list[str], submodels: SubmodelParams,
               consumers: list[tilepass.Consumer]) -> Callable[[], dict[str, Any]]:
    providers = choose_providers(submodels.providers, slide.device)
    models = [get_submodel(resolve_spec_path(s), providers) for s in specs]
    skipped = {m.spec.name: _not_rgb(slide) if slide.info.multichannel
               else _skip_reason(m, background) for m in models}
    now = [(m, np.ones(len(grid), bool)) for m in models
           if skipped[m.spec.name] is None and m.spec.zeroshot_classes is None]
    later = [m for m in models
             if skipped[m.spec.name] is None and m.spec.zeroshot_classes is not None]
    c = tilepass.Consumer(
        "submodels", "onnx",
        lambda b: run_models(b, grid, np.arange(len(grid)), now, submodels.mpp_tolerance),
        grid, slide.stream_params.batch_size)
    if now:
        consumers.append(c)

    def finish() -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for m in models:
            why = skipped[m.spec.name]
            if why is not None:
                summary[m.spec.name] = _record_skip(slide, m, why)
        for (m, sel), acc in zip(now, c.result or [], strict=True):
            summary[m.spec.name] = _store(slide, grid, m, sel, acc)
        if later:
            summary.update(_run_on_classes(slide, grid, later, submodels))
        return summary

    return finish


def _not_rgb(slide: SlideContext) -> str:
    return (f"fluorescence / multichannel image ({len(slide.info.channels)} channels); "
            "this sub-model needs RGB brightfield tiles")


def _skip_reason(m: Submodel, background: str | None) -> str | None:
    want = m.spec.input.background
    if want != "any" and background is not None and background != want:
        return f"needs a {want} background (bright-field); this slide's is {background}"
    return None


def _record_skip(slide: SlideContext, m: Submodel, why: str) -> dict[str, Any]:
    slide.store.write_submodel(m.spec.name, {}, {**_base_attrs(m), "counts": {},
                                                "scores": {}, "skipped": why})
    log.info("%s: sub-model %s not run: %s", slide.slide_id, m.spec.name, why)
    return {"skipped": why}


def _run_on_classes(slide: SlideContext, grid: TileGrid, models: list[Submodel],
                    submodels: SubmodelParams) -> dict[str, Any]:
    """Sub-models that run on some zero-shot classes only: a stream of their own over
    the union of their tiles, once the zero-shot classes are known."""
    zs = slide.store.read_zeroshot()
    active = [(m, select_rows(m.spec, len(grid), None if zs is None else zs.classes,
                              None if zs is None else zs.top)) for m in models]
    rows = np.flatnonzero(np.logical_or.reduce([sel for _, sel in active]))
    part = dataclasses.replace(grid, coords=grid.coords[rows],
                               tissue_fraction=grid.tissue_fraction[rows])
    accs = run_models(slide.stream(part), grid, rows, active, submodels.mpp_tolerance)
    return {m.spec.name: _store(slide, grid, m, sel, acc)
            for (m, sel), acc in zip(active, accs, strict=True)}


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
