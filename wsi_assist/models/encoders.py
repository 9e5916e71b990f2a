"""Model folders as their authors release them: specs, strict loading, preprocessing.

A folder spec is ``KIND:/path/to/folder``, or the folder alone (its kind is then told
from its files):

- ``open_clip:/dir``: an open_clip hub folder (QuiltNet, PathGen-CLIP):
  ``open_clip_config.json`` + ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``. QuickGELU and the preprocessing come from that config.
- ``hf-clip:/dir``: a transformers ``CLIPModel`` folder (PLIP, PathGen-CLIP-L):
  ``config.json`` (``model_type: clip``) + ``model.safetensors`` or ``pytorch_model.bin``
  + ``preprocessor_config.json`` + the tokenizer files. Embeddings and zero-shot.
- ``timm:/dir``: a timm hub folder (UNI / UNI2, Virchow2, H-optimus, Prov-GigaPath):
  ``config.json`` with ``architecture``, ``model_args`` and ``pretrained_cfg`` + weights.
  Image only. A model whose pooling is off (``global_pool: ""``, as Virchow2) gives the
  class token and the mean of the patch tokens, concatenated (Virchow's published recipe).
- ``hf:/dir``: a transformers image encoder (Phikon-v2: ``Dinov2Model``; Phikon:
  ``ViTModel``) + ``preprocessor_config.json``; the class token of the last hidden
  state. Image only.

Each model is preprocessed as published: input size, resize, centre crop, interpolation,
mean and std from its own config. Weights are read with ``torch.load(weights_only=True)``
or safetensors and must match the model key for key; no code named by a model file or
config runs (no ``trust_remote_code``; the few layer classes a timm config may name are
looked up in a fixed list).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_assist.errors import ModelError
from wsi_assist.models.modelspec import (
    LoadedModel,
    ModelSpec,
    check_state_dict,
    file_sha256,
    open_clip_loaded,
    read_state_dict,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KINDS = ("open_clip", "hf-clip", "timm", "hf")
IMAGE_ONLY = ("timm", "hf")
VALID_SPECS = ("expected 'pathclip', 'pathclip:/file.pt', 'ARCH:/file.pt' (an open_clip "
               "architecture), 'hf-hub:org/repo', or a model folder as 'open_clip:/dir', "
               "'hf-clip:/dir', 'timm:/dir', 'hf:/dir' (or the folder alone, its kind told "
               "from its files)")
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHTS = {
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"),
    "hf-clip": ("model.safetensors", "pytorch_model.bin"),
    "timm": ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth"),
    "hf": ("model.safetensors", "pytorch_model.bin"),
}
HF_IMAGE_TYPES = ("dinov2", "vit", "dinov2_with_registers")
#: Layer classes a timm ``model_args`` may name by dotted path (Virchow / UNI2 configs).
TIMM_LAYERS = ("timm.layers.SwiGLUPacked", "timm.layers.SwiGLU", "timm.layers.Mlp",
               "timm.layers.GluMlp", "torch.nn.SiLU", "torch.nn.GELU")
#: transformers' ``resample`` codes (PIL's) -> our interpolation.
RESAMPLE = {2: "bilinear", 3: "bicubic"}


def parse_folder_spec(spec: str) -> ModelSpec | None:
    """A ModelSpec for ``KIND:/dir`` or an existing folder; None for other specs."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        folder = Path(rest).expanduser()
        if not rest or not folder.is_dir():
            raise ModelError(f"model spec {spec!r}: {folder} is not a folder; a {kind} model "
                             f"is a folder holding {_expects(kind)}")
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        kind = detect_kind(folder)
    else:
        return None
    return _folder_spec(spec, kind, folder)


def detect_kind(folder: Path) -> str:
    """The kind of a model folder, from its files."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    cfg = _read_json(folder / HF_CONFIG) if (folder / HF_CONFIG).is_file() else None
    if isinstance(cfg, dict) and "architecture" in cfg:
        return "timm"
    if isinstance(cfg, dict) and cfg.get("model_type") == "clip":
        return "hf-clip"
    if isinstance(cfg, dict) and cfg.get("model_type") in HF_IMAGE_TYPES:
        return "hf"
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise ModelError(f"{folder}: not a model folder of a known kind (found {found}); "
                     f"{VALID_SPECS}")


def _expects(kind: str) -> str:
    config = OPEN_CLIP_CONFIG if kind == "open_clip" else HF_CONFIG
    return f"{config} and one of {', '.join(WEIGHTS[kind])}"


def _folder_spec(spec: str, kind: str, folder: Path) -> ModelSpec:
    config = folder / (OPEN_CLIP_CONFIG if kind == "open_clip" else HF_CONFIG)
    if not config.is_file():
        raise ModelError(f"{folder}: no {config.name}; a {kind} model folder holds "
                         f"{_expects(kind)}")
    weights = next((folder / n for n in WEIGHTS[kind] if (folder / n).is_file()), None)
    if weights is None:
        raise ModelError(f"{folder}: no weights file; a {kind} model folder holds "
                         f"{_expects(kind)}")
    cfg = _read_json(config)
    if not isinstance(cfg, dict):
        raise ModelError(f"{config}: not a JSON object; a {kind} model folder holds "
                         f"{_expects(kind)}")
    if kind == "open_clip":
        model_cfg = cfg.get("model_cfg", cfg)
        quick = bool(model_cfg.get("quick_gelu", False)) if isinstance(model_cfg, dict) else False
        return ModelSpec(spec=spec, arch=f"local-dir:{folder}", weights=weights,
                         quick_gelu=quick, kind=kind, folder=folder)
    arch = str(cfg.get("architecture") or cfg.get("model_type") or kind)
    if kind == "hf-clip":
        vision = cfg.get("vision_config") or {}
        quick = vision.get("hidden_act", "quick_gelu") == "quick_gelu"
    else:
        quick = False
    return ModelSpec(spec=spec, arch=arch, weights=weights, quick_gelu=quick, kind=kind,
                     folder=folder)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read it as JSON: {e}") from e


def load_folder(spec: ModelSpec, device: str) -> LoadedModel:
    """Build the model of a folder spec, load its weights strictly, ready on ``device``."""
    loaders = {"open_clip": _load_open_clip, "hf-clip": _load_hf_clip, "timm": _load_timm,
               "hf": _load_hf_image}
    if spec.folder is None or spec.weights is None or spec.kind not in loaders:
        raise ModelError(f"model spec {spec.spec!r}: not a model folder; {VALID_SPECS}")
    lm = loaders[spec.kind](spec, device)
    log.info("loaded %s (%s) on %s, %d-d", spec.spec, spec.describe(), device, lm.embed_dim)
    return lm


def _frozen(model: Any, device: str) -> Any:
    import torch

    model = model.eval().to(torch.device(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- open_clip hub folders ---------------------------------------------------------------

def _load_open_clip(spec: ModelSpec, device: str) -> LoadedModel:
    import open_clip

    assert spec.weights is not None and spec.folder is not None  # checked by load_folder
    if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
        raise ModelError(f"{spec.folder}: open_clip {open_clip.__version__} cannot build a "
                         "model from a local folder; install open_clip_torch>=2.32")
    sd = read_state_dict(spec.weights, spec.arch, "an open_clip state_dict")
    try:
        model = open_clip.create_model(f"local-dir:{spec.folder}", load_weights=False,
                                       device="cpu")
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise ModelError(f"{spec.folder / OPEN_CLIP_CONFIG}: open_clip cannot build the "
                         f"model it describes (unrecognised architecture?): {e}") from e
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(sd, model, spec.weights, spec.arch,
                     what=f"the open_clip model of {OPEN_CLIP_CONFIG}")
    model.load_state_dict(sd, strict=True)
    return open_clip_loaded(spec, model, device, file_sha256(spec.weights))


# --- preprocessing from a transformers preprocessor_config.json -------------------------

def hf_preprocessing(folder: Path) -> dict[str, Any]:
    """image_size, resize_px, interpolation, mean, std of a transformers image processor
    config (resize the shortest edge, centre-crop, rescale, normalise)."""
    path = folder / PREPROCESSOR
    if not path.is_file():
        raise ModelError(f"{folder}: no {PREPROCESSOR}; the model's published preprocessing "
                         "(size, crop, mean, std) is read from it")
    cfg = _read_json(path)
    try:
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height")
        crop = cfg.get("crop_size", size) if cfg.get("do_center_crop", False) else size
        if isinstance(crop, dict):
            crop = crop.get("height")
        resize, crop = int(size), int(crop)
        if not cfg.get("do_resize", True):
            resize = crop
        factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1
        if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
            raise ValueError(f"rescale_factor {factor} (only 1/255 is supported)")
        mean = tuple(float(v) for v in cfg.get("image_mean", (0.0, 0.0, 0.0)))
        std = tuple(float(v) for v in cfg.get("image_std", (1.0, 1.0, 1.0)))
        if not cfg.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean and image_std need 3 values")
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{path}: unusable preprocessing: {e}") from e
    return {"image_size": crop, "resize_px": resize, "mean": mean, "std": std,
            "interpolation": RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic")}


def _hf_from_pretrained(cls: Any, spec: ModelSpec) -> Any:
    """``cls.from_pretrained`` offline, refusing any missing or unexpected weight."""
    try:
        model, info = cls.from_pretrained(str(spec.folder), output_loading_info=True,
                                          local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelError(f"{spec.folder}: transformers cannot load it as {cls.__name__}: "
                         f"{e}") from e
    problems = []
    for key, words in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "shape-mismatched")):
        keys = sorted(str(k) for k in info.get(key) or [])
        if keys:
            more = f", ... {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {words} keys (e.g. "
                            + ", ".join(repr(k) for k in keys[:5]) + more + ")")
    if problems:
        raise ModelError(f"{spec.weights}: does not match transformers {cls.__name__} of "
                         f"{HF_CONFIG}: " + "; ".join(problems))
    return model


def _loaded(spec: ModelSpec, model: Any, device: str, backend: Any,
            prep: dict[str, Any]) -> LoadedModel:
    import torch

    assert spec.weights is not None
    size = int(prep["image_size"])
    with torch.no_grad():
        dim = int(backend.image(torch.zeros(1, 3, size, size, device=device)).shape[1])
    return LoadedModel(spec=spec, model=model, device=device,
                       sha256=file_sha256(spec.weights), embed_dim=dim, backend=backend,
                       image_size=size, resize_px=int(prep["resize_px"]),
                       interpolation=str(prep["interpolation"]),
                       mean=prep["mean"], std=prep["std"])


# --- transformers CLIPModel folders ------------------------------------------------------

class HfClipBackend:
    """A transformers ``CLIPModel``: projected image and text features, its tokenizer."""

    has_text = True

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return self.model.visual_projection(pooled)

    def text(self, texts: list[str], device: str) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(device),
                                    attention_mask=tok["attention_mask"].to(device))
        return self.model.text_projection(out.pooler_output)

    def logit_scale(self) -> float:
        return float(min(100.0, float(self.model.logit_scale.detach().exp().cpu())))


def _load_hf_clip(spec: ModelSpec, device: str) -> LoadedModel:
    from transformers import AutoTokenizer, CLIPModel

    assert spec.folder is not None
    prep = hf_preprocessing(spec.folder)
    model = _frozen(_hf_from_pretrained(CLIPModel, spec), device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{spec.folder}: no usable tokenizer files (tokenizer.json, or "
                         f"vocab.json + merges.txt): {e}") from e
    return _loaded(spec, model, device, HfClipBackend(model, tokenizer), prep)


# --- transformers image encoders (Phikon-v2, Phikon) -------------------------------------

class ImageOnlyBackend:
    """An image encoder without a text tower; ``forward`` maps pixels to features."""

    has_text = False

    def __init__(self, forward: Any) -> None:
        self.forward = forward

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def text(self, texts: list[str], device: str) -> torch.Tensor:
        raise ModelError("this image-only encoder has no text tower")

    def logit_scale(self) -> float:
        raise ModelError("this image-only encoder has no text tower")


def _load_hf_image(spec: ModelSpec, device: str) -> LoadedModel:
    import transformers

    assert spec.folder is not None
    cfg = _read_json(spec.folder / HF_CONFIG)
    classes = {"dinov2": "Dinov2Model", "vit": "ViTModel",
               "dinov2_with_registers": "Dinov2WithRegistersModel"}
    name = classes.get(str(cfg.get("model_type")))
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ModelError(f"{spec.folder / HF_CONFIG}: unrecognised architecture (model_type "
                         f"{cfg.get('model_type')!r}); hf: image encoders are "
                         f"{', '.join(HF_IMAGE_TYPES)}")
    prep = hf_preprocessing(spec.folder)
    model = _frozen(_hf_from_pretrained(cls, spec), device)

    def cls_token(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).last_hidden_state[:, 0]

    return _loaded(spec, model, device, ImageOnlyBackend(cls_token), prep)


# --- timm hub folders (UNI, UNI2, Virchow2, H-optimus, Prov-GigaPath) --------------------

def _timm_args(args: dict[str, Any], path: Path) -> dict[str, Any]:
    """``model_args`` with the dotted layer names of ``TIMM_LAYERS`` resolved."""
    import timm.layers
    import torch

    known = {"timm.layers.SwiGLUPacked": getattr(timm.layers, "SwiGLUPacked", None),
             "timm.layers.SwiGLU": getattr(timm.layers, "SwiGLU", None),
             "timm.layers.Mlp": timm.layers.Mlp,
             "timm.layers.GluMlp": getattr(timm.layers, "GluMlp", None),
             "torch.nn.SiLU": torch.nn.SiLU, "torch.nn.GELU": torch.nn.GELU}
    out = {}
    for k, v in args.items():
        if isinstance(v, str) and "." in v:
            if known.get(v) is None:
                raise ModelError(f"{path}: model_args.{k} names {v!r}, which is not one of the "
                                 f"layer classes allowed ({', '.join(TIMM_LAYERS)})")
            v = known[v]
        out[k] = v
    return out


def timm_preprocessing(pcfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """timm's eval transform of a ``pretrained_cfg``: resize to size / crop_pct, centre
    crop, mean and std."""
    try:
        size = int(pcfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(pcfg.get("crop_pct") or 0.875)
        mean = tuple(float(v) for v in pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(float(v) for v in pcfg.get("std", (0.229, 0.224, 0.225)))
    except (TypeError, ValueError, IndexError) as e:
        raise ModelError(f"{path}: unusable pretrained_cfg preprocessing: {e}") from e
    return {"image_size": size, "resize_px": math.floor(size / crop_pct), "mean": mean,
            "std": std, "interpolation": str(pcfg.get("interpolation") or "bicubic")}


def _load_timm(spec: ModelSpec, device: str) -> LoadedModel:
    import timm

    assert spec.folder is not None and spec.weights is not None
    path = spec.folder / HF_CONFIG
    cfg = _read_json(path)
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    if "num_classes" in cfg:
        pcfg["num_classes"] = cfg["num_classes"]
    args = _timm_args(dict(cfg.get("model_args") or {}), path)
    sd = read_state_dict(spec.weights, spec.arch, f"a timm {spec.arch} state_dict")
    try:
        model = timm.create_model(spec.arch, pretrained=False, pretrained_cfg=pcfg, **args)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{path}: timm cannot build architecture {spec.arch!r} "
                         f"(unrecognised architecture?): {e}") from e
    check_state_dict(sd, model, spec.weights, spec.arch, what=f"timm {spec.arch} of {path.name}")
    model.load_state_dict(sd, strict=True)
    model = _frozen(model, device)
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    def features(x: torch.Tensor) -> torch.Tensor:
        import torch

        out = model(x)
        if out.ndim == 3:  # pooling off (Virchow2): class token + mean of the patch tokens
            out = torch.cat([out[:, 0], out[:, prefix:].mean(dim=1)], dim=-1)
        return out

    return _loaded(spec, model, device, ImageOnlyBackend(features),
                   timm_preprocessing(pcfg, path))
