"""Annotations and draft reports of one slide, from what its stages stored.

:func:`build_slide_outputs` needs only the slide's store (``slide.zarr`` and the files
beside it), so ``wsi-assist report`` reruns it without models or the slide file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsi_assist import aggregate, files
from wsi_assist.errors import WsiAssistError
from wsi_assist.report import data, html, images, markdown, pdf, qupath
from wsi_assist.settings import ReportParams
from wsi_assist.store import Overview, SlideStore, SubmodelRecord, ZeroShot
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


def build_slide_outputs(store: SlideStore, params: ReportParams, *,
                        stages: dict[str, dict[str, str]], config_hash: str,
                        slide_id: str | None = None, info: dict[str, Any] | None = None,
                        slide_path: Path | None = None,
                        seconds: dict[str, float] | None = None,
                        scratch: Path | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Aggregate the slide's stored findings; write its annotations, pictures and
    reports into the slide folder. ``stages``: the status of each stage (done, or not
    run and how to enable it); ``scratch``: a folder for Chromium's temporary files
    (default: the slide folder); ``device``: what the models ran on. Returns a short
    summary."""
    out_dir = store.folder
    slide_id = slide_id or out_dir.name
    overview = store.read_overview()
    if overview is None:
        raise WsiAssistError(f"{out_dir}: slide.zarr has no overview; run the 'tissue' "
                             "stage first")
    slide = store.read_slide()
    if slide.mpp is None:
        raise WsiAssistError(f"{out_dir}: slide.zarr records no mpp for the slide")
    tissue = store.read_tissue()
    grid = store.read_grid() if store.has_grid() else None
    zs = store.read_zeroshot()
    subs = store.read_submodels()
    regions = _regions(grid, zs, tissue.geometry, tissue.area_um2, params)
    n_feats = qupath.write_annotations(store, regions, grid, zs, subs,
                                            include_tiles=params.include_tiles)
    picture = store.read_report_picture()
    sharp = _sharpest(overview, store.read_thumbnail(), picture)
    # read for the page: drawn at its own size; a stored thumbnail at report.image_px
    overlay_px = max(params.image_px, max(picture.image.shape[:2])) \
        if picture is not None and sharp is picture else None
    pics = images.overlay_and_heatmaps(out_dir, sharp.image, sharp.downsample, grid,
                                       zs, regions, tissue.geometry, slide.mpp, params,
                                       origin=sharp.origin, overlay_px=overlay_px)
    captions = store.read_captions()
    gallery = _gallery(out_dir, captions, grid, zs, overview.image, overview.downsample,
                       slide_path, params)
    findings = data.submodel_findings(subs)
    report = {
        "schema": data.SCHEMA, "schema_version": data.SCHEMA_VERSION, "notice": data.NOTICE,
        "slide": data.slide_section(slide, grid, slide_id, info),
        "qc": data.qc(store, grid, params.empty_tile_tissue),
        "stain": data.stain(store),
        "stages": data.stage_statuses(stages, findings),
        "composition": data.composition(zs, regions),
        "submodels": _with_pictures(findings, subs, store, grid,
                                    overview.image, overview.downsample, slide_path, params),
        "representative_tiles": gallery,
        "summary": store.read_summary(),
        "images": {"thumbnail": "thumbnail.png" if (out_dir / "thumbnail.png").is_file()
                   else None, **pics},
        "annotations": {"file": qupath.ANNOTATIONS_FILE, "n_features": n_feats},
        "provenance": data.provenance(store.read_embedding_model(), zs,
                                      subs, captions, config_hash, slide.version, seconds,
                                      device),
    }
    files.write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    files.write_text(out_dir / "report.md", markdown.render(report))
    files.write_text(out_dir / "report.html", html.render(report, out_dir))
    pdf_note = _write_pdf(report, out_dir, scratch) if params.pdf \
        else "disabled (report.pdf: false)"
    return {"annotations": n_feats, "regions": sum(not r.geometry.is_empty for r in regions),
            "heatmaps": len(pics["heatmaps"]), "pdf": pdf_note}


def _write_pdf(report: dict[str, Any], out_dir: Path, scratch: Path | None) -> str:
    """report.pdf, printed from the page as report.html shows it with its large
    pictures as JPEG (:func:`html.render` ``for_print``): a hidden file in ``scratch``
    (else the slide folder), removed after."""
    folder = scratch if scratch is not None else out_dir
    folder.mkdir(parents=True, exist_ok=True)
    page = files.temp_name(folder / "report-print.html")
    try:
        page.write_text(html.render(report, out_dir, for_print=True), encoding="utf-8")
        return pdf.write_pdf(page, out_dir / "report.pdf", scratch)
    finally:
        page.unlink(missing_ok=True)


def _sharpest(overview: Overview, thumbnail: Overview | None,
              picture: Overview | None = None) -> Overview:
    """The slide picture of the report: the report picture the report stage read from
    the slide (the tissue region at ``report.picture_px``), else the finer of the stored
    overview (``tissue.overview_mpp``, 8 µm/px by default) and the thumbnail
    (``outputs.thumbnail_px``)."""
    if picture is not None and picture.image.ndim == 3 and picture.image.shape[2] == 3:
        return picture
    if thumbnail is None or thumbnail.image.ndim != 3 or thumbnail.image.shape[2] != 3:
        return overview
    return thumbnail if thumbnail.downsample < overview.downsample else overview


def _regions(grid: TileGrid | None, zs: ZeroShot | None, tissue: shapely.MultiPolygon,
             tissue_area_um2: float | None, params: ReportParams
             ) -> list[aggregate.ClassRegion]:
    if zs is None or grid is None:
        return []
    if len(zs.top) != len(grid):
        raise WsiAssistError(f"zeroshot/top has {len(zs.top)} rows but coords has "
                             f"{len(grid)}; rerun 'zeroshot'")
    return aggregate.class_regions(grid, zs.top, zs.classes, zs.colors,
                                   min_region_um2=params.min_region_um2,
                                   tissue=None if tissue.is_empty else tissue,
                                   tissue_area_um2=tissue_area_um2,
                                   exclude=zs.uncertain if params.exclude_uncertain else None)


def _gallery(out_dir: Path, captions: list[dict[str, Any]] | None, grid: TileGrid | None,
             zs: ZeroShot | None, overview: np.ndarray, downsample: float,
             slide_path: Path | None, params: ReportParams) -> list[dict[str, Any]]:
    """Captioned tiles when ``captions.json`` exists, else the most confident per class."""
    if captions:
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
    if zs is None or grid is None or params.gallery_per_class == 0:
        return []
    exclude = zs.uncertain if params.exclude_uncertain else None
    picks = images.pick_tiles(grid, zs, params.gallery_per_class, exclude)
    images.save_tiles(out_dir, picks, overview, downsample, slide_path)
    return picks


def _with_pictures(findings: list[dict[str, Any]], subs: list[SubmodelRecord],
                   store: SlideStore, grid: TileGrid | None, overview: np.ndarray,
                   downsample: float, slide_path: Path | None, params: ReportParams
                   ) -> list[dict[str, Any]]:
    """Each sub-model's findings with its pictures (outlines on a sharp field, DAB map)."""
    qc = store.read_qc()
    focus = None if qc is None else qc.get("focus")
    for f, s in zip(findings, subs, strict=True):
        f["pictures"] = {} if grid is None else images.nuclei_pictures(
            store.folder, s, grid, focus, overview, downsample, slide_path,
            max_px=params.image_px // 2 + 160)
    return findings


def _inside(base: Path, target: Path) -> bool:
    b, t = base.resolve(), target.resolve()
    return b in t.parents
