"""The ``report`` stage: ``annotations.geojson`` and ``report.{json,md,html,pdf}``."""

from __future__ import annotations

from typing import Any

from wsi_assist.report.build import build_slide_outputs
from wsi_assist.settings import ReportParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import SlideStore

REPORT_FILE = "report.json"


def done(store: SlideStore) -> bool:
    return (store.folder / REPORT_FILE).is_file()


def run(slide: SlideContext, report: ReportParams) -> dict[str, Any]:
    """Build the slide's annotations and reports from its stored results."""
    return build_slide_outputs(slide.store, report, stages=slide.stage_status(slide.store),
                               config_hash=slide.config_hash, slide_id=slide.slide_id,
                               info=slide.info.to_json(), slide_path=slide.path,
                               device=slide.device)
