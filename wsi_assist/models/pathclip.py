"""PathCLIP and other open_clip models: specs, safe loading, preprocessing, encoders.

A model spec is one of

- ``pathclip``: open_clip ``ViT-B-16`` with QuickGELU and the local ``pathclip-base.pt``
  named by ``embed.pathclip`` (or ``--pathclip``) or the ``WSI_ASSIST_PATHCLIP`` variable;
- ``pathclip:/path/pathclip-base.pt``: the same architecture with an explicit file;
- ``ARCH:/path/ckpt.pt``: any open_clip architecture (``ViT-B-16``, ``ViT-B-32-quickgelu``,
  or one added with ``open_clip.add_model_config``) with a plain state_dict;
- ``hf-hub:org/repo``: an open_clip model from the Hugging Face hub (needs network);
- ``open_clip:/dir``, ``hf-clip:/dir``, ``timm:/dir``, ``hf:/dir`` or a plain ``/dir``:
  a model folder as its authors release it (see ``wsi_assist.models.encoders``).

Local checkpoints are read with ``torch.load(weights_only=True)`` (or safetensors) and
must match the architecture key for key and shape for shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_assist.errors import ModelError
from wsi_assist.files import FileCache
from wsi_assist.models import encoders
from wsi_assist.models.modelspec import (
    Backend,
    LoadedModel,
    ModelSpec,
    check_state_dict,
    file_sha256,
    open_clip_loaded,
    read_state_dict,
)
from wsi_assist.settings import EmbedParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Re-exported from ``modelspec``, where every loader's shared types live.
__all__ = ["Backend", "LoadedModel", "ModelSpec", "check_state_dict", "file_sha256",
           "load_model", "open_clip_loaded", "parse_spec", "read_state_dict"]

PATHCLIP_ARCH = "ViT-B-16"
PATHCLIP_ENV = "WSI_ASSIST_PATHCLIP"
HUB_PREFIX = "hf-hub:"


def pathclip_weights(configured: str | None = None) -> str | None:
    """The PathCLIP checkpoint: the configured path, else ``$WSI_ASSIST_PATHCLIP``."""
    return configured or os.environ.get(PATHCLIP_ENV) or None


def parse_spec(spec: str, pathclip: str | None = None) -> ModelSpec:
    """Parse a model spec (see the module docstring); ``pathclip`` is the configured file."""
    spec = spec.strip()
    if spec.startswith(HUB_PREFIX):
        return ModelSpec(spec=spec, arch=spec, hub=spec)
    if spec == "pathclip":  # before folders: a folder named "pathclip" is not this spec
        weights = pathclip_weights(pathclip)
        if weights is None:
            raise ModelError("model 'pathclip' has no weights: set embed.pathclip, pass "
                             f"--pathclip PATH or set {PATHCLIP_ENV} to pathclip-base.pt")
        return ModelSpec(spec=spec, arch=PATHCLIP_ARCH, weights=Path(weights).expanduser(),
                         quick_gelu=True)
    folder_spec = encoders.parse_folder_spec(spec)
    if folder_spec is not None:
        return folder_spec
    arch, sep, path = spec.partition(":")
    if not sep or not path:
        raise ModelError(f"model spec {spec!r}: {encoders.VALID_SPECS}")
    if arch == "pathclip":
        return ModelSpec(spec=spec, arch=PATHCLIP_ARCH, weights=Path(path).expanduser(),
                         quick_gelu=True)
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelError(f"model spec {spec!r}: unknown open_clip architecture {arch!r} "
                         "(see open_clip.list_models()), nor a model kind; "
                         f"{encoders.VALID_SPECS}")
    return ModelSpec(spec=spec, arch=arch, weights=Path(path).expanduser())


def configured_spec(params: EmbedParams) -> ModelSpec | None:
    """The spec of the ``embed`` section, or None when PathCLIP has no weights anywhere."""
    if params.model.strip() == "pathclip" and pathclip_weights(params.pathclip) is None:
        return None
    return parse_spec(params.model, params.pathclip)


def spec_sha256(spec: ModelSpec) -> str:
    """The weights' SHA-256; for a hub model, the hash of its id (the files live in the
    hub cache and are versioned there)."""
    if spec.weights is not None:
        return file_sha256(spec.weights)
    return hashlib.sha256(spec.spec.encode()).hexdigest()


_MODELS: FileCache[LoadedModel] = FileCache()


def load_model(spec: ModelSpec | str | LoadedModel, device: str = "cpu",
               pathclip: str | None = None) -> LoadedModel:
    """Build and load a model once per (spec, file state, device); eval mode, fp32.
    An already loaded model is returned as it is."""
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(spec, str):
        spec = parse_spec(spec, pathclip)
    weights = (spec.weights,) if spec.weights is not None else ()
    return _MODELS.get((spec, device), weights, lambda: _load(spec, device))


def _load(spec: ModelSpec, device: str) -> LoadedModel:
    import open_clip

    if spec.folder is not None:
        return encoders.load_folder(spec, device)
    if spec.hub is not None:
        try:
            model = open_clip.create_model(spec.hub, device="cpu")
        except Exception as e:  # hub, network and format errors all end here
            raise ModelError(f"{spec.hub}: cannot load from the Hugging Face hub "
                             f"(offline or not an open_clip model?): {e}") from e
        sha = spec_sha256(spec)
    else:
        if spec.weights is None:
            raise ModelError(f"model spec {spec.spec!r}: no weights file")
        sd = read_state_dict(spec.weights, spec.arch)
        with _quiet_open_clip():
            model = open_clip.create_model(spec.arch, pretrained=None, load_weights=False,
                                           force_quick_gelu=spec.quick_gelu, device="cpu")
        check_state_dict(sd, model, spec.weights, spec.arch)
        model.load_state_dict(sd, strict=True)
        sha = file_sha256(spec.weights)
    return open_clip_loaded(spec, model, device, sha)


class _DropNoPretrained(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's "no pretrained weights" warning: ours are loaded right after."""
    f = _DropNoPretrained()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def preprocess(tiles: torch.Tensor, size: int, mean: tuple[float, ...] | torch.Tensor,
               std: tuple[float, ...] | torch.Tensor, resize_px: int | None = None,
               interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> normalised float32 (N, 3, size, size) there:
    resized to ``resize_px`` (default ``size``; antialiased ``interpolation``), then
    centre-cropped to ``size``. ``mean`` and ``std``: 3 values, or tensors already there
    (no host copy per batch)."""
    import torch
    import torch.nn.functional as F

    x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    r = resize_px or size
    if x.shape[-2:] != (r, r):
        mode = "bilinear" if interpolation == "bilinear" else "bicubic"
        x = F.interpolate(x, size=(r, r), mode=mode, antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    if r != size:
        top = (r - size) // 2  # timm / transformers centre crop: the floor of the margin
        x = x[..., top:top + size, top:top + size]
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def no_text_tower(spec: ModelSpec) -> str:
    """Why text (zero-shot classes, text queries) cannot be embedded with ``spec``."""
    return (f"{spec.spec}: {spec.kind} model {spec.arch} is an image-only encoder with no "
            "text tower; zero-shot classes and text queries need a model with a text tower "
            "(pathclip, an open_clip model or folder, or a hf-clip: CLIPModel folder)")


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def encode_images(lm: LoadedModel, tiles: torch.Tensor, precision: str = "auto",
                  raw: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) tiles (on ``lm.device``) -> L2-normalised float32 (N, D), or
    the model's own unnormalised features when ``raw``."""
    import torch
    import torch.nn.functional as F

    dtype = autocast_dtype(precision, lm.device)
    with torch.inference_mode():
        x = preprocess(tiles, lm.image_size, *lm.norm_tensors, resize_px=lm.resize_px,
                       interpolation=lm.interpolation)
        with torch.autocast(device_type="cuda", dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            feats = lm.image_features(x)
        return feats.float() if raw else F.normalize(feats.float(), dim=-1)


def encode_text(model_spec: ModelSpec | str | LoadedModel, texts: list[str], *,
                pathclip: str | None = None, device: str = "cpu",
                batch_size: int = 256) -> np.ndarray:
    """Texts -> L2-normalised float32 (n, D) with the model's tokenizer and text tower."""
    import open_clip
    import torch
    import torch.nn.functional as F

    lm = load_model(model_spec, device, pathclip)
    if not lm.has_text:
        raise ModelError(no_text_tower(lm.spec))
    if not texts:
        return np.zeros((0, lm.embed_dim), np.float32)
    backend = lm.backend
    tokenizer = open_clip.get_tokenizer(lm.spec.arch) if backend is None else None
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            if backend is not None:
                feats = backend.text(chunk, lm.device)
            else:
                feats = lm.model.encode_text(tokenizer(chunk).to(lm.device))  # type: ignore[misc]
            out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out).numpy()
