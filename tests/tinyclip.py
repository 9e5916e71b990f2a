"""A tiny open_clip ViT registered from a JSON config, saved as a plain state_dict."""

from __future__ import annotations

import json
from pathlib import Path

TINY_ARCH = "wsi-tiny-vit"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                         "heads": 2, "layers": 2}}


def register_tiny(folder: Path) -> str:
    """Add the tiny architecture to open_clip's registry; returns its name."""
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        path = folder / f"{TINY_ARCH}.json"
        path.write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(path)
    return TINY_ARCH


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Random weights of the tiny architecture, saved like pathclip-base.pt."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, load_weights=False)
    torch.save(model.state_dict(), path)
    return path
