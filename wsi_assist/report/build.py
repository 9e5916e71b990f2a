"""The ``report`` stage: annotations and draft reports from what the stages stored.

:func:`build_slide_outputs` needs only the slide's folder (``slide.zarr``,
``tissue.geojson`` and optional ``captions.json``, ``summary.json``, ``findings/``), so
``wsi-assist report`` reruns it without models; :func:`run_report` is the pipeline stage.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
import zarr

from wsi_assist import aggregate, annotate
from wsi_assist.config import Config
from wsi_assist.errors import WsiAssistError
from wsi_assist.report import data, html, images, markdown, pdf
from wsi_assist.report.params import ReportParams

if TYPE_CHECKING:
    from wsi_assist.pipeline import SlideRun

log = logging.getLogger(__name__)


def run_report(run: SlideRun) -> dict[str, Any]:
    """Pipeline stage: write ``annotations.geojson`` and ``report.{json,md,html,pdf}``."""
    return build_slide_outputs(run.out_dir, run.store, run.config, slide_id=run.slide_id,
                               info=run.info.to_json(), slide_path=run.path)


def build_slide_outputs(out_dir: Path, store: zarr.Group, config: Config, *,
                        slide_id: str | None = None, info: dict[str, Any] | None = None,
                        slide_path: Path | None = None,
                        seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Aggregate the stored findings of the slide in ``out_dir``; write its annotations,
    pictures and reports. Returns a short summary."""
    params: ReportParams = config.report
    slide_id = slide_id or out_dir.name
    if "overview" not in store:
        raise WsiAssistError(f"{out_dir}: slide.zarr has no overview; run the 'tissue' "
                             "stage first")
    overview = np.asarray(store["overview"][...])
    downsample = float(store["overview"].attrs["downsample"])
    mpp = float(store.attrs.get("slide_mpp") or store.attrs["mpp"])
    tissue = _read_tissue(out_dir / "tissue.geojson")
    layout = data.read_layout(store)
    zs = data.read_zeroshot(store)
    subs = data.read_submodels(store)
    regions = _regions(store, layout, zs, tissue, params)
    n_feats = annotate.write_annotations(out_dir, regions, layout, zs, subs,
                                            include_tiles=params.include_tiles)
    pics = images.overlay_and_heatmaps(out_dir, overview, downsample, layout, zs, regions,
                                       tissue, mpp, params)
    captions = data.read_json(out_dir / "captions.json")
    gallery = _gallery(out_dir, captions, layout, zs, overview, downsample, slide_path,
                       params)
    report = {
        "schema": data.SCHEMA, "schema_version": data.SCHEMA_VERSION, "notice": data.NOTICE,
        "slide": data.slide_section(store, slide_id, info),
        "qc": data.qc(store, params.empty_tile_tissue),
        "stages": data.stage_status(store, out_dir),
        "composition": data.composition(zs, regions),
        "submodels": data.submodel_findings(subs),
        "representative_tiles": gallery,
        "summary": data.read_json(out_dir / "summary.json"),
        "images": {"thumbnail": "thumbnail.png" if (out_dir / "thumbnail.png").is_file()
                   else None, **pics},
        "annotations": {"file": "annotations.geojson", "n_features": n_feats},
        "provenance": data.provenance(store, zs, subs, captions if isinstance(captions, list)
                                      else None, config.section_hash(*config.sections),
                                      seconds),
    }
    _write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    _write_text(out_dir / "report.md", markdown.render(report))
    _write_text(out_dir / "report.html", html.render(report, out_dir))
    pdf_note = pdf.write_pdf(out_dir / "report.html", out_dir / "report.pdf") \
        if params.pdf else "disabled (report.pdf: false)"
    return {"annotations": n_feats, "regions": sum(not r.geometry.is_empty for r in regions),
            "heatmaps": len(pics["heatmaps"]), "pdf": pdf_note}


def _regions(store: zarr.Group, layout: aggregate.TileLayout | None,
             zs: data.ZeroShot | None, tissue: shapely.MultiPolygon,
             params: ReportParams) -> list[aggregate.ClassRegion]:
    if zs is None or layout is None:
        return []
    if len(zs.top) != len(layout.coords):
        raise WsiAssistError(f"zeroshot/top has {len(zs.top)} rows but coords has "
                             f"{len(layout.coords)}; rerun 'zeroshot'")
    exclude = zs.uncertain if params.exclude_uncertain else None
    area = store.attrs.get("tissue_area_um2")
    return aggregate.class_regions(layout, zs.top, zs.classes, zs.colors,
                                   min_region_um2=params.min_region_um2,
                                   tissue=None if tissue.is_empty else tissue,
                                   tissue_area_um2=None if area is None else float(area),
                                   exclude=exclude)


def _gallery(out_dir: Path, captions: Any, layout: aggregate.TileLayout | None,
             zs: data.ZeroShot | None, overview: np.ndarray, downsample: float,
             slide_path: Path | None, params: ReportParams) -> list[dict[str, Any]]:
    """Captioned tiles when ``captions.json`` exists, else the most confident per class."""
    if isinstance(captions, list) and captions:
        keep = ("x", "y", "tile_png", "class", "prob", "caption", "model", "prompt")
        out = []
        for c in captions:
            item = {k: c.get(k) for k in keep if k in c}
            png = item.get("tile_png")
            if png and not _inside(out_dir, out_dir / str(png)):
                log.warning("captions.json: tile_png %r outside the slide folder; ignored", png)
                item["tile_png"] = None
            out.append(item)
        return out
    if zs is None or layout is None or params.gallery_per_class == 0:
        return []
    exclude = zs.uncertain if params.exclude_uncertain else None
    picks = images.pick_tiles(layout, zs, params.gallery_per_class, exclude)
    images.save_tiles(out_dir, picks, overview, downsample, slide_path)
    return picks


def _read_tissue(path: Path) -> shapely.MultiPolygon:
    from wsi_assist.pipeline import read_tissue

    return read_tissue(path) if path.is_file() else shapely.MultiPolygon()


def _inside(base: Path, target: Path) -> bool:
    b, t = base.resolve(), target.resolve()
    return b in t.parents


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
