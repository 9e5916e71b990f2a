"""The ``report`` stage: ``annotations.geojson`` and ``report.{json,md,html,pdf}``."""

from __future__ import annotations

import logging
from typing import Any

from wsi_assist import thumbnail
from wsi_assist.errors import WsiAssistError, in_words
from wsi_assist.report.build import build_slide_outputs
from wsi_assist.report.images import picture_bounds
from wsi_assist.settings import ReportParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import Overview, SlideStore

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


def done(store: SlideStore) -> bool:
    return (store.folder / REPORT_FILE).is_file()


def run(slide: SlideContext, report: ReportParams) -> dict[str, Any]:
    """Read the report's picture from the slide, then build the slide's annotations and
    reports from its stored results."""
    store_picture(slide, report.picture_px)
    return build_slide_outputs(slide.store, report, stages=slide.stage_status(slide.store),
                               config_hash=slide.config_hash, slide_id=slide.slide_id,
                               info=slide.info.to_json(), slide_path=slide.path,
                               device=slide.device)


def store_picture(slide: SlideContext, long_px: int) -> Overview | None:
    """The tissue region (and tiles) read from the slide file about ``long_px`` on its
    long side, stored as the report picture (``wsi-assist report OUT`` reuses it). An RGB
    slide only (a multichannel one keeps its pseudo-colour thumbnail); a picture that
    cannot be read is said in one line, and the report uses the stored thumbnail."""
    info, store = slide.info, slide.store
    if info.multichannel or not store.has_tissue():
        return None
    grid = store.read_grid() if store.has_grid() else None
    bounds = picture_bounds(store.read_tissue_geometry(), grid) \
        or (0.0, 0.0, float(info.width), float(info.height))
    box = thumbnail.picture_box(bounds, info.width, info.height)
    try:
        with slide.open_slide() as s:
            image, ds = thumbnail.read_picture(s, info, box, long_px)
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, WsiAssistError) as e:
        log.warning("%s: report picture not read from the slide (%s); the report uses "
                    "the thumbnail", slide.path, in_words(e, "unreadable image data"))
        return None
    picture = Overview(image, ds, (float(box[0]), float(box[1])))
    store.write_report_picture(picture)
    return picture
