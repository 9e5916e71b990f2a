"""The ``tiles`` stage: the tile grid over the stored tissue, the thumbnail, and quality
scores of every tile read through the tile stream.

On a multichannel (fluorescence) slide the thumbnail is pseudo-colour and tile focus is
measured on the nuclear channel."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from wsi_assist import qc, thumbnail
from wsi_assist.channels import pictures
from wsi_assist.errors import WsiAssistError
from wsi_assist.lowres import read_lowres
from wsi_assist.settings import ChannelParams, OutputParams, TilingParams
from wsi_assist.stages import tilepass
from wsi_assist.stages.context import SlideContext
from wsi_assist.tiling import TileGrid
from wsi_assist.tiling import grid as lay_grid

log = logging.getLogger(__name__)


def run(slide: SlideContext, tiling: TilingParams, outputs: OutputParams,
        channels: ChannelParams) -> dict[str, Any]:
    """Lay the grid, draw the thumbnail and score every tile."""
    return tilepass.run_alone(slide, open_pass(slide, tiling, outputs, channels))


def open_pass(slide: SlideContext, tiling: TilingParams, outputs: OutputParams,
              channels: ChannelParams) -> tilepass.Planned:
    """Lay the grid and draw the thumbnail; the tile scores come from the pass."""
    store = slide.store
    if not store.has_tissue():
        raise WsiAssistError(f"{slide.path}: no tissue.geojson; run the 'tissue' stage first")
    tissue = store.read_tissue_geometry()
    g = lay_grid(slide.info, tissue, tiling)
    store.write_grid(g)
    if len(g) == 0:
        log.warning("%s: no tiles with at least %.0f%% tissue", slide.path,
                    100 * tiling.min_tissue)
    info = slide.info
    thumb_mpp = info.require_mpp() * max(1.0, max(info.width, info.height)
                                         / outputs.thumbnail_px)
    with slide.open_slide() as s:
        img, ds = read_lowres(s, info, thumb_mpp)
    score, description = qc.scores, qc.DESCRIPTION
    if info.multichannel:
        pics = pictures(img, info.channels, info.channel_colors, channels.nuclear,
                        channels.percentiles)
        img = pics.color
        score = qc.ChannelScores(pics.index, pics.levels)
        description = qc.channel_description(pics.nuclear_name, channels.percentiles)
    store.write_thumbnail(img, ds)
    drawn = thumbnail.draw(img, ds, tissue, g if outputs.draw_tiles else None,
                           max_px=outputs.thumbnail_px, synthetic=info.synthetic)
    drawn.save(slide.out_dir / "thumbnail.png")
    summary: dict[str, Any] = {"n_tiles": len(g), "level": g.level,
                               "delivered_mpp": g.delivered_mpp}
    if not len(g):
        return tilepass.Planned([], lambda: summary)
    qc_c = tilepass.Consumer("tiles", "qc", lambda b: qc.tile_qc(b, len(g), score), g,
                             slide.stream_params.batch_size)
    return tilepass.Planned([qc_c], lambda: _finish(slide, g, qc_c.result, description,
                                                    summary))


def _finish(slide: SlideContext, g: TileGrid, scores: qc.TileQC, description: str,
            summary: dict[str, Any]) -> dict[str, Any]:
    slide.store.write_qc(scores.as_array(), ["background", "focus"], description,
                         damaged=scores.damaged)
    summary |= {"tiles_per_s": round(scores.tiles_per_s, 1),
                "median_focus": round(float(np.median(scores.focus)), 1),
                "median_background": round(float(np.median(scores.background)), 3),
                "damaged_tiles": scores.n_damaged}
    if scores.n_damaged:
        log.warning("%s: %d of %d tiles hold damaged image data (decoded anyway; "
                    "see damaged_rows in tile_qc)", slide.path, scores.n_damaged, len(g))
    return summary
