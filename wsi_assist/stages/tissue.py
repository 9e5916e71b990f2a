"""The ``tissue`` stage: an overview of the slide, tissue polygons, ``tissue.geojson``.

A multichannel (fluorescence) slide's tissue is found on its nuclear channel, scaled to
8 bits, as a dark-background image; its stored overview is a pseudo-colour picture."""

from __future__ import annotations

import logging
from typing import Any

from wsi_assist import stain as stain_mod
from wsi_assist import tissue as tissue_mod
from wsi_assist.channels import pictures
from wsi_assist.lowres import read_lowres
from wsi_assist.settings import ChannelParams, StainParams, TissueParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import Overview

log = logging.getLogger(__name__)


def run(slide: SlideContext, tissue: TissueParams, stain: StainParams,
        channels: ChannelParams) -> dict[str, Any]:
    """Detect tissue on an overview (resolution from ``tissue_mod.overview_mpp``; the
    nuclear channel of a multichannel slide) and store both; then the kind of image and
    its stain vectors from the overview's tissue pixels."""
    mpp = slide.info.require_mpp()
    want = tissue_mod.overview_mpp(slide.info.width, slide.info.height, mpp, tissue,
                                   slide.info.level_downsamples)
    with slide.open_slide() as s:
        image, ds = read_lowres(s, slide.info, want)
    detect_on, extra = image, {}
    if slide.info.multichannel:
        info = slide.info
        pics = pictures(image, info.channels, info.channel_colors, channels.nuclear,
                        channels.percentiles)
        detect_on, image = pics.nuclear, pics.color
        tissue = tissue.model_copy(update={"background": "dark"})
        extra = {"nuclear_channel": pics.nuclear_name, "nuclear_channel_from": pics.how}
        log.info("%s: tissue from the nuclear channel %r (%s)", slide.slide_id,
                 pics.nuclear_name, pics.how)
    found = tissue_mod.detect(detect_on, ds, mpp, tissue)
    pieces = slide.store.write_tissue(Overview(image, ds), found.mask, found.geometry,
                                      found.background, found.threshold, mpp,
                                      method=found.method, levels=found.levels)
    warnings = tissue_mod.warnings(found.geometry)
    for w in warnings:
        log.warning("%s: %s", slide.path, w)
    stains = stain_mod.slide_stains(image, found.mask, found.background == "dark", stain)
    slide.store.write_stains(stains)
    return {"tissue_pieces": pieces, "tissue_area_mm2": found.area_um2 / 1e6,
            "background": found.background, "method": found.method,
            "overview_mpp": round(found.overview_mpp, 4), "stain": stains.label,
            "warnings": warnings, **extra}
