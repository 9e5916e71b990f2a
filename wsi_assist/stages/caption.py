"""The ``caption`` stage: representative tiles captioned by an image-text-to-text model
(cached), their PNGs, ``captions.json`` and the draft ``summary.json``."""

from __future__ import annotations

from typing import Any

from wsi_assist import caption as cap
from wsi_assist import files, represent, summary
from wsi_assist.errors import StageSkipped
from wsi_assist.models.captioner import build_prompt
from wsi_assist.settings import CaptionParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import SlideStore

HOW_TO_ENABLE = ("no captioner configured; set caption.model to a folder saved with "
                 "save_pretrained or a hub id of an image-text-to-text model (LLaVA, "
                 "Qwen2-VL, ...) to caption representative tiles")


def configured(store: SlideStore, caption: CaptionParams) -> bool:
    """A captioning model is configured."""
    return on_device(caption)


def on_device(caption: CaptionParams) -> bool:
    """The captioner runs on the device when one is configured."""
    return caption.model is not None


def run(slide: SlideContext, caption: CaptionParams) -> dict[str, Any]:
    """Caption representative tiles (from the cache where possible), draft a summary."""
    model = caption.model
    if model is None:
        raise StageSkipped(HOW_TO_ENABLE)
    store = slide.store
    grid = store.read_grid()
    zs = store.read_zeroshot()
    picks, notes = cap.choose(grid, caption, store.read_embeddings(), zs)
    rows = [p.row for p in picks]
    fingerprint = store.read_slide().fingerprint
    if not fingerprint:  # a batch stores it before the stages run
        fingerprint = files.file_fingerprint(slide.path)
        store.set_fingerprint(fingerprint)
    findings = cap.tile_findings(grid, rows, zs, store.read_submodels())
    prompts = [build_prompt(caption.prompt, f) for f in findings]
    extra = {"max_new_tokens": caption.max_new_tokens, "tile_px": grid.tile_px,
             "mpp": grid.delivered_mpp}
    keys = [cap.cache_key(model, pr, fingerprint, (int(grid.coords[r][0]),
                                                   int(grid.coords[r][1])), extra)
            for pr, r in zip(prompts, rows)]
    cache_path = cap.cache_file(slide.out_root or slide.out_dir.parent, slide.slide_id)
    cache = cap.load_cache(cache_path)
    with slide.open_slide() as s:
        tiles = represent.read_tiles(s, grid, rows)
    pngs = [represent.save_png(slide.out_dir, int(grid.coords[r][0]), int(grid.coords[r][1]), t)
            for r, t in zip(rows, tiles)]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        cap.generate(model, slide.device, caption, [tiles[i] for i in todo],
                     [prompts[i] for i in todo], [keys[i] for i in todo], cache)
        files.write_json(cache_path, cache)
    records = [cap.record(p, f, grid, png, pr, cache[k], model)
               for p, f, png, pr, k in zip(picks, findings, pngs, prompts, keys)]
    store.write_captions(records)
    method = _summarise(slide, caption, records)
    return {"n_captions": len(records), "generated": len(todo),
            "cached": len(records) - len(todo), "summary": method, **notes}


def _summarise(slide: SlideContext, caption: CaptionParams,
               records: list[dict[str, Any]]) -> str:
    """Write ``summary.json`` (an LLM's draft, or the template); returns the method."""
    found = summary.collect_findings(slide.store)
    if caption.summary_model:
        text = summary.llm_summary(caption.summary_model, summary.llm_prompt(found, records),
                                   slide.device, caption.summary_max_new_tokens)
        method, model = "llm", caption.summary_model
    else:
        text, method, model = summary.template_summary(found, records), "template", None
    slide.store.write_summary(summary.summary_doc(text, method, model, found, len(records),
                                                  caption.model))
    return method
