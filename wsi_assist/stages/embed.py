"""The ``embed`` stage: the configured image encoder over every tile."""

from __future__ import annotations

import logging
from typing import Any

from wsi_assist.errors import ModelError, StageSkipped
from wsi_assist.models.embed import embed_batches, make_encoder, used_precision
from wsi_assist.models.pathclip import configured_spec
from wsi_assist.settings import EmbedParams
from wsi_assist.stages import tilepass
from wsi_assist.stages.context import SlideContext
from wsi_assist.store import Embeddings, FeatureFile, SlideStore, write_feature_file

log = logging.getLogger(__name__)

HOW_TO_ENABLE = ("no PathCLIP weights configured: set embed.pathclip (or pass --pathclip "
                 "PATH, or set WSI_ASSIST_PATHCLIP) to pathclip-base.pt, or set embed.model "
                 "to another model (ARCH:/path/ckpt.pt, hf-hub:org/repo, or a model folder: "
                 "open_clip:/dir, hf-clip:/dir, timm:/dir, hf:/dir)")


def configured(store: SlideStore, embed: EmbedParams) -> bool:
    """An embedding model is configured (PathCLIP weights, or another spec)."""
    return on_device(embed)


def on_device(embed: EmbedParams) -> bool:
    """The stage runs a model on the device: one is configured."""
    return configured_spec(embed) is not None


def check(embed: EmbedParams) -> None:
    """The configured weights file exists (loading it is left to the stage: it is large)."""
    spec = configured_spec(embed)
    if spec is not None and spec.weights is not None and not spec.weights.is_file():
        raise ModelError(f"{spec.weights}: model file not found (embed.pathclip, "
                         "--pathclip or WSI_ASSIST_PATHCLIP)")


def run(slide: SlideContext, embed: EmbedParams) -> dict[str, Any]:
    """L2-normalised float16 embeddings of every tile, stored row-aligned with coords."""
    return tilepass.run_alone(slide, open_pass(slide, embed))


def open_pass(slide: SlideContext, embed: EmbedParams) -> tilepass.Planned:
    """Load the encoder; the pass feeds it every tile, ``embed.batch_size`` at a time."""
    spec = configured_spec(embed)
    if spec is None:  # ``configured`` said so already; kept for direct callers
        raise StageSkipped(HOW_TO_ENABLE)
    grid = slide.store.read_grid()
    encoder = make_encoder(spec, embed, slide.device)
    c = tilepass.Consumer("embed", "embed",
                          lambda b: embed_batches(encoder, b, len(grid),
                                                  keep_features=embed.features_h5),
                          grid, embed.batch_size or slide.stream_params.batch_size)

    def finish() -> dict[str, Any]:
        res = c.result
        slide.store.write_embeddings(Embeddings(
            vectors=res.embeddings, model=spec.spec, model_sha256=encoder.sha256,
            engine=embed.engine, precision=used_precision(embed, slide.device)))
        if res.features is not None:
            path = write_feature_file(slide.store.features_path(spec.name), FeatureFile(
                features=res.features, slide_name=slide.slide_id, encoder=spec.spec,
                model_sha256=encoder.sha256, l2_normalised=encoder.normalised,
                level0_size=(slide.info.width, slide.info.height)), grid)
            log.info("%s: MIL features written to %s", slide.slide_id, path)
        wait = res.input_wait_s / max(res.seconds, 1e-9)
        log.info("%s: %d tiles embedded at %.1f tiles/s (%.0f%% waiting for input)",
                 slide.slide_id, len(grid), res.tiles_per_s, 100 * wait)
        return {"n_tiles": len(grid), "dim": encoder.embed_dim, "engine": embed.engine,
                "tiles_per_s": round(res.tiles_per_s, 2),
                "input_wait_fraction": round(wait, 3)}

    return tilepass.Planned([c], finish)
