"""The ``zeroshot`` stage: class probabilities of every tile from its embedding and a
prompt set, the top class, an uncertain flag, and the slide's composition."""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_assist.errors import StageSkipped, WsiAssistError
from wsi_assist.models import zeroshot as zs_mod
from wsi_assist.models.encoders import IMAGE_ONLY
from wsi_assist.models.pathclip import configured_spec, no_text_tower
from wsi_assist.settings import EmbedParams, ZeroShotParams
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import SlideStore, ZeroShot


def configured(store: SlideStore, zeroshot: ZeroShotParams, embed: EmbedParams) -> bool:
    """Embeddings are stored, or a model that makes them is configured."""
    return store.has_embeddings() or on_device(zeroshot, embed)


def on_device(zeroshot: ZeroShotParams, embed: EmbedParams) -> bool:
    """The text encoder of the configured embedding model runs on the device."""
    return configured_spec(embed) is not None


def run(slide: SlideContext, zeroshot: ZeroShotParams, embed: EmbedParams) -> dict[str, Any]:
    """Classify the stored embeddings with the text embeddings of the prompt set."""
    emb = slide.store.read_embeddings()
    if emb is None:
        raise WsiAssistError(f"{slide.path}: slide.zarr has no embeddings; run 'embed' first")
    prompts = zs_mod.load_prompt_set(zeroshot.prompts)
    spec = configured_spec(embed)
    if spec is not None and spec.kind in IMAGE_ONLY:
        raise StageSkipped(no_text_tower(spec))
    cache = zeroshot.cache_dir or (None if slide.out_root is None else
                                   slide.out_root / ".cache" / "text-embeddings")
    text = zs_mod.text_embeddings(spec if spec is not None else emb.model, prompts,
                                  cache=cache, device=slide.device,
                                  model_sha256=emb.model_sha256)
    probs = zs_mod.classify(emb.vectors, text)
    top = probs.argmax(axis=1).astype(np.int16) if len(probs) else np.zeros(0, np.int16)
    uncertain = probs.max(axis=1, initial=0.0) < zeroshot.threshold
    grid = slide.store.read_grid()
    per_class, unc = zs_mod.composition(top, uncertain, grid.tissue_fraction,
                                        grid.cell_area_mm2, prompts.names)
    slide.store.write_zeroshot(ZeroShot(
        classes=prompts.names, colors=[(c[0], c[1], c[2]) for c in prompts.colors],
        probs=probs, top=top, uncertain=uncertain, prompt_set=prompts.name,
        prompt_sha256=prompts.sha256, model=emb.model, threshold=zeroshot.threshold,
        composition=per_class, uncertain_summary=unc))
    top_class = max(per_class, key=lambda k: per_class[k]["area_mm2"]) if len(top) else None
    return {"n_tiles": len(top), "prompt_set": prompts.name, "top_class": top_class,
            "uncertain_fraction": round(unc["fraction"], 3)}
