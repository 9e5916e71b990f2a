"""One slide through the configured stages.

A stage is a function ``(SlideRun) -> dict`` that reads what earlier stages stored
(``slide.zarr``, files in the slide's folder) and stores its own results; the dict it
returns is a short summary (counts, areas) for logs and the manifest. Stages know
nothing of the CLI or of Dask. Later issues add stages to ``STAGE_FUNCS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr

from wsi_assist import geojson, store, thumbnail
from wsi_assist.caption import run_caption
from wsi_assist.config import Config
from wsi_assist.errors import StageSkipped, WsiAssistError
from wsi_assist.models.embed import run_embed
from wsi_assist.models.submodels import run_submodels
from wsi_assist.models.zeroshot import run_zeroshot
from wsi_assist.report.build import run_report
from wsi_assist.slide import SlideInfo
from wsi_assist.stream import TileBatch
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

TISSUE_COLOR = (0, 160, 80)


@dataclass
class SlideRun:
    """What a stage sees of one slide."""

    path: Path
    slide_id: str
    out_dir: Path
    config: Config
    info: SlideInfo
    store: zarr.Group
    summary: dict[str, Any] = field(default_factory=dict)
    #: The batch output folder (OUT); None when the slide is run outside a batch.
    out_root: Path | None = None

    @property
    def device(self) -> str:
        """The configured device, with ``auto`` resolved (cuda when available)."""
        return resolve_device(self.config.parallelism.device)

    def read_grid(self) -> TileGrid:
        """The stored tile grid; a WsiAssistError naming the slide when there is none."""
        try:
            return store.read_grid(self.store)
        except KeyError as e:
            raise WsiAssistError(f"{self.path}: {e.args[0]}") from e

    def open_slide(self) -> Any:
        from wsi_assist.slide import open_slide

        return open_slide(self.path)

    def stream(self, grid: TileGrid, batch_size: int | None = None) -> Iterator[TileBatch]:
        """The slide's tiles of ``grid`` with the ``stream`` settings (an iterator of
        ``TileBatch``); ``batch_size`` overrides ``stream.batch_size``."""
        from wsi_assist.stream import stream

        sc = self.config.stream
        return stream(self.path, grid, batch_size=batch_size or sc.batch_size,
                      prefetch=sc.prefetch, threads=sc.threads)


def run_tissue(run: SlideRun) -> dict[str, Any]:
    """Overview, tissue polygons, ``tissue.geojson``; the overview is kept in the store."""
    from wsi_assist import slide as slide_mod
    from wsi_assist import tissue

    params = run.config.tissue
    with run.open_slide() as s:
        overview, ds = slide_mod.read_lowres(s, run.info, params.overview_mpp)
    found = tissue.detect(overview, ds, run.info.require_mpp(), params)
    store.write_array(run.store, "overview", overview, rows_per_chunk=1024,
                      downsample=ds, description="RGB overview tissue was detected on")
    store.write_array(run.store, "tissue_mask", found.mask, rows_per_chunk=1024, downsample=ds)
    run.store.attrs.update({"tissue_background": found.background,
                            "tissue_threshold": found.threshold,
                            "tissue_area_um2": found.area_um2})
    write_tissue_geojson(run.out_dir / "tissue.geojson", found.geometry, run.info.require_mpp())
    if found.geometry.is_empty:
        log.warning("%s: no tissue found", run.path)
    return {"tissue_pieces": len(found.polygons), "tissue_area_mm2": found.area_um2 / 1e6,
            "background": found.background}


def write_tissue_geojson(path: Path, tissue: shapely.MultiPolygon, mpp: float) -> int:
    """One QuPath annotation per tissue piece, with its area in um^2."""
    feats = (geojson.feature(
        poly, "annotation", name=f"Tissue {i + 1}", classification=("Tissue", TISSUE_COLOR),
        measurements={"Area um^2": poly.area * mpp**2, "Perimeter um": poly.length * mpp})
        for i, poly in enumerate(tissue.geoms))
    return geojson.write_features(path, feats)


def read_tissue(path: Path) -> shapely.MultiPolygon:
    """The tissue polygons stored in ``tissue.geojson``."""
    from shapely.geometry import shape

    from wsi_assist.tissue import as_multipolygon

    feats = geojson.read_features(path)
    return as_multipolygon(shapely.union_all([shape(f["geometry"]) for f in feats])
                           if feats else shapely.MultiPolygon())


def run_tiles(run: SlideRun) -> dict[str, Any]:
    """The tile grid over the stored tissue, written to the store, and the thumbnail."""
    from wsi_assist import tiling

    tissue_path = run.out_dir / "tissue.geojson"
    if not tissue_path.exists():
        raise WsiAssistError(f"{run.path}: no tissue.geojson; run the 'tissue' stage first")
    tissue_geom = read_tissue(tissue_path)
    g = tiling.grid(run.info, tissue_geom, run.config.tiling)
    store.write_grid(run.store, g)
    if len(g) == 0:
        log.warning("%s: no tiles with at least %.0f%% tissue", run.path,
                    100 * run.config.tiling.min_tissue)
    out = run.config.outputs
    img, ds = read_thumbnail(run, out.thumbnail_px)
    store.write_array(run.store, "thumbnail", img, rows_per_chunk=1024, downsample=ds,
                      description="RGB thumbnail, pixels are `downsample` level-0 px wide")
    drawn = thumbnail.draw(img, ds, tissue_geom, g if out.draw_tiles else None,
                           max_px=out.thumbnail_px, synthetic=run.info.synthetic)
    drawn.save(run.out_dir / "thumbnail.png")
    summary = {"n_tiles": len(g), "level": g.level, "delivered_mpp": g.delivered_mpp}
    if len(g):
        summary |= write_tile_qc(run, g)
    return summary


def write_tile_qc(run: SlideRun, g: TileGrid) -> dict[str, Any]:
    """Read every tile through the stream and store its quality scores (``tile_qc``)."""
    from wsi_assist.qc import WHITE, tile_qc

    qc = tile_qc(run.stream(g), len(g))
    store.write_array(run.store, "tile_qc", qc.as_array(), axes=["tile", "score"],
                      scores=["background", "focus"],
                      description=f"background: fraction of pixels with R, G, B > {WHITE}; "
                                  "focus: variance of the Laplacian of grey at half "
                                  "resolution (higher is sharper)")
    return {"tiles_per_s": round(qc.tiles_per_s, 1),
            "median_focus": round(float(np.median(qc.focus)), 1),
            "median_background": round(float(np.median(qc.background)), 3)}


def read_thumbnail(run: SlideRun, max_px: int) -> tuple[np.ndarray, float]:
    """An RGB image whose longest side is at least ``max_px`` (or the whole level 0)."""
    from wsi_assist.slide import read_lowres

    info = run.info
    mpp = info.require_mpp() * max(1.0, max(info.width, info.height) / max_px)
    with run.open_slide() as s:
        return read_lowres(s, info, mpp)


StageFunc = Callable[[SlideRun], dict[str, Any]]
STAGE_FUNCS: dict[str, StageFunc] = {"tissue": run_tissue, "tiles": run_tiles,
                                     "embed": run_embed, "zeroshot": run_zeroshot,
                                     "submodels": run_submodels, "caption": run_caption,
                                     "report": run_report}


def run_stages(run: SlideRun, stages: tuple[str, ...]) -> dict[str, float]:
    """Run ``stages`` in order; returns seconds per stage. Exceptions carry ``.stage``."""
    seconds: dict[str, float] = {}
    for name in stages:
        func = STAGE_FUNCS.get(name)
        if func is None:
            raise WsiAssistError(f"stage {name!r} is not available in this version; "
                                 f"available: {', '.join(STAGE_FUNCS)}")
        t0 = time.perf_counter()
        try:
            run.summary[name] = func(run)
        except StageSkipped as e:
            run.summary[name] = {"skipped": str(e)}
            run.store.attrs[f"{name}_skipped"] = str(e)
            log.info("%s: %s not run: %s", run.slide_id, name, e)
            continue
        except Exception as e:
            e.stage = name  # type: ignore[attr-defined]
            raise
        seconds[name] = time.perf_counter() - t0
        log.debug("%s: %s done in %.2f s: %s", run.slide_id, name, seconds[name],
                  run.summary[name])
    return seconds


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other specs unchanged."""
    if spec != "auto":
        return spec
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
