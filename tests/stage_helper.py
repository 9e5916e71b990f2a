"""Run stages on one slide outside a batch, the way the batch runs them."""

from __future__ import annotations

from pathlib import Path

from wsi_assist.files import file_fingerprint
from wsi_assist.settings import Config
from wsi_assist.slide import describe
from wsi_assist.stages import REGISTRY, SlideContext, run_stages, stage_table
from wsi_assist.store import SlideStore


def slide_context(slide: Path, folder: Path, cfg: Config, slide_id: str | None = None
                  ) -> SlideContext:
    """A context for ``slide`` whose store is ``folder`` (created or reopened)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = describe(slide)
    store = SlideStore(folder, mode="a")
    store.write_slide(slide, info.mpp, info.mpp_source, info.synthetic,
                      file_fingerprint(slide), "test", layout=info.layout,
                      channels=info.channels)
    return SlideContext(path=slide, slide_id=slide_id or slide.stem, info=info, store=store,
                        device="cpu", stream_params=cfg.stream, out_root=folder.parent,
                        config_hash=cfg.section_hash(), stage_status=stage_table)


def run_stage(slide: SlideContext, cfg: Config, name: str) -> dict:
    """One stage's function called directly (errors, StageSkipped included, propagate)."""
    stage = REGISTRY[name]
    return stage.run(slide, **{s: cfg.section(s) for s in stage.sections})


def run_slide(slide: Path, folder: Path, cfg: Config, stages: tuple[str, ...] | None = None,
              slide_id: str | None = None) -> tuple[SlideContext, dict]:
    """The stages of ``cfg`` (or ``stages``) over ``slide`` into ``folder``; the context
    and the per-stage summaries."""
    ctx = slide_context(slide, folder, cfg, slide_id)
    summary, _ = run_stages(ctx, cfg, stages or cfg.stages)
    return ctx, summary
