"""The built-in analysis of the ``submodels`` stage: QuPath-style positive cell detection
(:mod:`wsi_assist.nuclei`) over the slide's tiles, read in blocks with a halo.

The tiles are analysed in blocks of about ``nuclei.analysisTileMicrons`` (whole tiles),
each with ``nuclei.haloMicrons`` of context on every side; a nucleus belongs to the tile
that holds its centroid (the last in raster order where tiles overlap, see
:meth:`TileGrid.owners`), so nuclei cut by tile or block borders are found whole and
once, and none outside the tissue tiles. Results go to the
store as sub-model ``nuclei``: centroids (``points``), classes (``labels``), the
measurement table (``measurements``) and outlines (``polygons`` with
``polygon_offsets``), with the DAB scores, the stains and the QuPath parameters as
attributes.

On fluorescence (a multichannel slide, or an RGB scan with a dark background) nuclei are
found on the nuclear channel and measured on every channel
(:mod:`wsi_assist.nuclei_fluorescence`); the DAB scores then say "not applicable", and
the per-channel means of the nucleus means are scores of their own.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import shapely

from wsi_assist import nuclei as nu
from wsi_assist import nuclei_fluorescence as nf
from wsi_assist.channels import nuclear_channel
from wsi_assist.settings import BUILTIN_NUCLEI, NucleiParams
from wsi_assist.slide import RGB_CHANNELS
from wsi_assist.stages.context import SlideContext
from wsi_assist.stain import StainVectors, default_vectors
from wsi_assist.store import (
    SUB_LABELS,
    SUB_MEASUREMENTS,
    SUB_POINTS,
    SUB_POLYGON_OFFSETS,
    SUB_POLYGONS,
    SlideStore,
)
from wsi_assist.stream import TileBatch
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

NAME = BUILTIN_NUCLEI
TASK = "nucleus-detection"
#: Blocks per batch of the stream (a block of 512 um at 0.5 um/px is about 3 MB).
BATCH = 2


def slide_stains(store: SlideStore, setting: str) -> StainVectors:
    """The stain vectors nuclei are measured with: ``setting`` names a kind (QuPath's
    default vectors for it), or is ``auto``: the slide's own, when stored, else QuPath's
    H&E defaults (so DAB is scored only on slides known to be H-DAB)."""
    if setting != "auto":
        return default_vectors("brightfield-hdab" if setting == "brightfield-hdab"
                               else "brightfield-he")
    stored = store.read_stains()  # found by the tissue stage
    return stored if stored is not None else default_vectors("brightfield-he")


def halo_px(grid: TileGrid, params: NucleiParams) -> int:
    """The halo, in delivered pixels, of ``params.haloMicrons``."""
    return max(1, math.ceil(params.haloMicrons / grid.delivered_mpp))


def block_cells(grid: TileGrid, params: NucleiParams) -> int:
    """Grid cells per side of the regions analysed at once (``analysisTileMicrons``)."""
    cell_um = grid.stride_l0 * grid.mpp
    return max(1, int(round(params.analysisTileMicrons / cell_um)))


def analysis_grid(grid: TileGrid, params: NucleiParams) -> tuple[TileGrid, np.ndarray]:
    """The haloed blocks the analysis reads, and the block of each tile of ``grid``."""
    return grid.blocks(block_cells(grid, params), halo_px(grid, params))


def analyse(batches: Iterable[TileBatch], grid: TileGrid, blocks: TileGrid,
            block_of: np.ndarray, stains: StainVectors, params: NucleiParams,
            level_size: tuple[int, int], fluorescence: nf.Setup | None = None
            ) -> nu.Nuclei:
    """Nuclei (level-0 px) of the haloed ``blocks`` of ``grid`` (see
    :func:`analysis_grid`) streamed as ``batches``: each keeps those whose centroid
    belongs to one of its tiles (:meth:`TileGrid.owners`). ``level_size``: (width, height) of the grid's level;
    beyond it the slide's edge pixels are repeated, as when the whole image is analysed
    at once, and no nucleus reaches past it. With ``fluorescence``, nuclei are found on
    its nuclear channel and measured on every channel (:mod:`wsi_assist.nuclei_fluorescence`).
    Blocks are analysed ``params.workers`` at a time (threads), their nuclei kept in
    stream order."""
    names = (nu.measurement_names(stains) if fluorescence is None
             else nf.measurement_names(fluorescence.names))
    order = np.argsort(block_of, kind="stable")
    members = np.split(order, np.searchsorted(block_of[order], np.arange(1, len(blocks))))
    job = _BlockJob(grid, blocks, members, stains, params, level_size, fluorescence)
    work = ((i, tile) for batch in batches
            for i, tile in zip(batch.index.tolist(), batch.tiles, strict=True))
    parts = list(_in_threads(job, work, workers(params)))
    return nu.Nuclei.concat([p for p in parts if p is not None], names)


def workers(params: NucleiParams) -> int:
    """Threads analysing blocks: ``params.workers``, or for 0 one per core (at most 4)."""
    return params.workers or min(4, os.cpu_count() or 1)


def _in_threads(job: Callable[[int, np.ndarray], nu.Nuclei | None],
                work: Iterable[tuple[int, np.ndarray]], n: int
                ) -> Iterator[nu.Nuclei | None]:
    """``job(i, tile)`` of each item of ``work``, in order, ``n`` at a time; no more
    than ``2 n`` blocks are held at once."""
    if n <= 1:
        yield from (job(i, tile) for i, tile in work)
        return
    with ThreadPoolExecutor(n, thread_name_prefix="nuclei") as pool:
        pending: deque[Future[nu.Nuclei | None]] = deque()
        for i, tile in work:
            pending.append(pool.submit(job, i, tile))
            if len(pending) >= 2 * n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _BlockJob:
    """The analysis of one haloed block: nuclei (level-0 px) of its own tiles."""

    def __init__(self, grid: TileGrid, blocks: TileGrid, members: list[np.ndarray],
                 stains: StainVectors, params: NucleiParams, level_size: tuple[int, int],
                 fluorescence: nf.Setup | None = None) -> None:
        self.grid, self.blocks, self.members = grid, blocks, members
        self.stains, self.params, self.level_size = stains, params, level_size
        self.fluorescence = fluorescence
        self.ds = grid.level_downsample
        self.level_xy = blocks.level_coords().astype(np.float64)
        self.step = blocks.read_px / blocks.tile_px  # level px per delivered px
        corner = grid.level_coords().astype(np.float64) * self.ds
        self.tiles = np.concatenate([corner, corner + grid.read_px * self.ds], axis=1)
        self.halo = halo_px(grid, params)

    def __call__(self, i: int, tile: np.ndarray) -> nu.Nuclei | None:
        ds, step, halo, xy = self.ds, self.step, self.halo, self.level_xy[i]
        lo, hi = on_slide(tile.shape[0], xy, step, self.level_size)
        core = (self.tiles[self.members[i]] - np.r_[xy, xy] * ds) / (ds * step)
        # what is worth analysing: the cores and their halo, on the slide or just off it
        a0 = np.maximum(np.floor(core[:, :2].min(axis=0)).astype(int) - halo,
                        np.maximum(lo - halo, 0))
        a1 = np.minimum(np.ceil(core[:, 2:].max(axis=0)).astype(int) + halo,
                        np.minimum(hi + halo, tile.shape[0]))
        if (hi <= lo).any() or (a1 <= a0).any():
            return None
        part = tile[a0[1]:a1[1], a0[0]:a1[0]]
        v0, v1 = np.clip(lo - a0, 0, a1 - a0), np.clip(hi - a0, 0, a1 - a0)
        image, box = edge_extended(part, v0, v1), (v0[0], v0[1], v1[0], v1[1])
        mpp, core = self.blocks.delivered_mpp, core - np.r_[a0, a0]
        if self.fluorescence is not None:
            found = nf.detect(image, mpp, self.fluorescence, self.params, core=core,
                              valid=box)
        else:
            found = nu.detect_nuclei(image, mpp, self.stains, self.params, core=core,
                                     valid=box)
        o = (xy + a0 * step) * ds
        found = found.transformed((o[0], o[1]), ds * step)
        return found.select(np.isin(self.grid.owners(found.centroids), self.members[i]))


def on_slide(t: int, corner: np.ndarray, step: float, level_size: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (x, y from ``lo`` to ``hi``) of a ``t``-pixel tile with its corner at
    level px ``corner`` (``step`` level px per pixel) that lie on the slide."""
    lo = np.clip(np.ceil(-corner / step), 0, t).astype(int)
    hi = np.clip(np.floor((np.asarray(level_size, np.float64) - corner) / step), 0, t
                 ).astype(int)
    return lo, hi


def edge_extended(tile: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``tile`` with its pixels outside x, y ``lo``..``hi`` (off the slide) replaced by
    the nearest ones inside, as filters see past the edge of a whole image."""
    h, w = tile.shape[:2]
    if (lo == 0).all() and hi[0] == w and hi[1] == h:
        return tile
    inner = tile[lo[1]:hi[1], lo[0]:hi[0]]
    return np.pad(inner, ((lo[1], h - hi[1]), (lo[0], w - hi[0]), (0, 0)), mode="edge")


def score_table(found: nu.Nuclei, pos: nu.Positivity, params: NucleiParams,
                area_mm2: float) -> dict[str, dict[str, Any]]:
    """The slide scores as the report shows them: value, definition, and for DAB scores
    on slides without DAB, ``not_applicable`` (the reason) and no value."""
    s = nu.summary(found, pos, area_mm2)
    t = (params.thresholdPositive1, params.thresholdPositive2, params.thresholdPositive3)
    na = None if pos.applicable else pos.reason
    comp = params.thresholdCompartment
    return {
        "nucleus_density_per_mm2": {
            "value": s["density_per_mm2"],
            "definition": "nuclei per mm² of analysed tissue"},
        "median_nucleus_area_um2": {
            "value": s["median_nucleus_area_um2"],
            "definition": "median of Nucleus: Area µm^2"},
        "positive_percent": {
            "value": s["positive_percent"], "not_applicable": na,
            "definition": f"Positive %: nuclei with {comp} >= thresholdPositive1 "
                          f"({t[0]:g}) / all nuclei x 100"},
        "h_score": {
            "value": s["h_score"], "not_applicable": na,
            "definition": f"H-score: 1 x %1+ + 2 x %2+ + 3 x %3+ (0..300), classes by "
                          f"{comp} >= {t[0]:g} / {t[1]:g} / {t[2]:g}"},
    }


def run(store: SlideStore, grid: TileGrid, batches: Iterable[TileBatch], blocks: TileGrid,
        block_of: np.ndarray, stains: StainVectors, params: NucleiParams,
        level_size: tuple[int, int]) -> dict[str, Any]:
    """Analyse the haloed blocks, score positivity and store everything as ``nuclei``."""
    found = analyse(batches, grid, blocks, block_of, stains, params, level_size)
    return record(store, grid, found, blocks, stains, params)


def record(store: SlideStore, grid: TileGrid, found: nu.Nuclei, blocks: TileGrid,
           stains: StainVectors, params: NucleiParams,
           fluorescence: nf.Setup | None = None) -> dict[str, Any]:
    """Score the positivity of nuclei ``found`` by :func:`analyse` and store everything
    as ``nuclei``; on ``fluorescence``, the channel means instead of DAB scores (which
    say "not applicable")."""
    pos = nu.score_positivity(found, stains, params)
    area_mm2 = float(grid.tissue_fraction.sum()) * grid.cell_area_mm2
    scores = score_table(found, pos, params, area_mm2)
    if fluorescence is not None:
        scores.update(nf.channel_mean_scores(found, fluorescence.names))
    warning = nu.density_warning(len(found), area_mm2, params)
    if warning is not None:
        log.warning("%s: %s", store.folder.name, warning)
    warnings = [] if warning is None else [warning]
    attrs = {**base_attrs(stains, params, pos), "counts": pos.counts, "scores": scores,
             "warnings": warnings,
             "intensity_counts": pos.intensity_counts or None, "n_tiles_run": len(grid),
             "analysed_area_mm2": area_mm2, "n_blocks": len(blocks),
             "halo_px": halo_px(grid, params), "analysis_mpp": blocks.delivered_mpp,
             **({} if fluorescence is None else fluorescence_attrs(fluorescence, params))}
    arrays = {SUB_POINTS: found.centroids, SUB_LABELS: pos.labels,
              SUB_MEASUREMENTS: found.measurements, SUB_POLYGONS: found.vertices,
              SUB_POLYGON_OFFSETS: found.offsets}
    store.write_submodel(NAME, arrays, attrs, array_attrs={
        SUB_MEASUREMENTS: {"measurement_names": list(found.names)},
        SUB_POLYGONS: {"description": "outline vertices, level-0 x, y; nucleus i is "
                                      "rows polygon_offsets[i]:polygon_offsets[i + 1]"}})
    log.debug("%s: %d nuclei, %s", store.folder.name, len(found), pos.counts)
    return {"counts": pos.counts, "scores": {k: v["value"] for k, v in scores.items()},
            "warnings": warnings}


def base_attrs(stains: StainVectors, params: NucleiParams, pos: nu.Positivity | None = None
               ) -> dict[str, Any]:
    """What every stored ``nuclei`` record says about how it was made."""
    classes = pos.classes if pos is not None else ()
    colors = pos.colors if pos is not None else ()
    return {"task": TASK, "classes": list(classes), "colors": [list(c) for c in colors],
            "classified": bool(pos is not None and pos.applicable),
            "method": 'QuPath-style "Positive cell detection" (wsi_assist.nuclei)',
            "parameters": {**params.qupath(),
                           "detectionImageBrightfield": nu.detection_image(stains, params)},
            "stains": stains.to_json(),
            "model_path": "built-in", "model_sha256": None}


def fluorescence_attrs(fl: nf.Setup, params: NucleiParams) -> dict[str, Any]:
    """What a fluorescence record says beyond :func:`base_attrs`: the method, QuPath's
    parameters with the detection channel and threshold used, and the channels."""
    return {"method": f'QuPath-style "Cell detection" on the fluorescence channel '
                      f'{fl.nuclear_name} (wsi_assist.nuclei_fluorescence)',
            "parameters": nf.parameters(fl, params),
            "fluorescence": {"channels": list(fl.names), "nuclear_channel": fl.nuclear_name,
                             "nuclear_channel_from": fl.how},
            "stains": None}  # no stain vectors measure fluorescence


def is_fluorescence(slide: SlideContext, background: str | None, stains: StainVectors
                    ) -> bool:
    """Whether nuclei are found on a fluorescence channel: a multichannel slide, a dark
    background, or a slide whose kind is fluorescence."""
    return slide.info.multichannel or background == "dark" or stains.kind == "fluorescence"


def fluorescence_setup(slide: SlideContext, params: NucleiParams,
                       nuclear: str | int = "auto") -> nf.Setup:
    """The nuclear channel (``channels.nuclear`` on a multichannel slide; on an RGB scan
    the one carrying the stain) and the detection threshold, from the slide's raw
    overview and its stored tissue."""
    from wsi_assist import tissue as tissue_mod
    from wsi_assist.lowres import read_lowres

    info = slide.info
    mpp = info.require_mpp()
    want = tissue_mod.overview_mpp(info.width, info.height, mpp,
                                   level_downsamples=info.level_downsamples)
    with slide.open_slide() as s:
        image, ds = read_lowres(s, info, want)
    if image.ndim == 2:
        image = image[..., None]
    geometry = slide.store.read_tissue().geometry
    shapely.prepare(geometry)
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    mask = shapely.contains_xy(geometry, (xx + 0.5) * ds, (yy + 0.5) * ds)
    names = info.channels if info.multichannel else RGB_CHANNELS
    chosen = nuclear_channel(names, nuclear) if info.multichannel else None
    fl = nf.setup(image, mask, names, chosen, params)
    log.info("%s: fluorescence nuclei on %r (%s), threshold %.4g (%s)", slide.slide_id,
             fl.nuclear_name, fl.how, fl.threshold, fl.threshold_from)
    return fl
