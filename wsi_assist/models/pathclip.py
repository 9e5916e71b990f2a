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
import functools
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from wsi_assist.errors import ModelError
from wsi_assist.files import FileCache
from wsi_assist.settings import EmbedParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PATHCLIP_ARCH = "ViT-B-16"
PATHCLIP_ENV = "WSI_ASSIST_PATHCLIP"
HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: an architecture plus either a local file or a hub id."""

    spec: str
    arch: str
    weights: Path | None = None
    hub: str | None = None
    quick_gelu: bool = False
    #: ``open_clip`` (an open_clip model: PathCLIP, ARCH:file, hub, open_clip folder),
    #: ``hf-clip``, ``timm`` or ``hf`` (see ``wsi_assist.models.encoders``).
    kind: str = "open_clip"
    #: The model folder, for a released folder layout.
    folder: Path | None = None

    def describe(self) -> str:
        src = self.hub or str(self.folder or self.weights)
        gelu = ", QuickGELU" if self.quick_gelu else ""
        return f"{self.kind} {self.arch}{gelu} from {src}"

    @property
    def name(self) -> str:
        """A short file-safe name of the model (the folder or file stem, or the hub id)."""
        if self.spec == "pathclip":
            raw = "pathclip"
        elif self.folder is not None:
            raw = self.folder.name
        elif self.weights is not None:
            raw = self.weights.stem
        else:
            raw = self.spec.rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "model"


class Backend(Protocol):
    """How a non-open_clip model (``wsi_assist.models.encoders``) embeds images and texts."""

    has_text: bool

    def image(self, x: torch.Tensor) -> torch.Tensor: ...

    def text(self, texts: list[str], device: str) -> torch.Tensor: ...

    def logit_scale(self) -> float: ...


@dataclass
class LoadedModel:
    """A model in eval mode on ``device``, with what preprocessing needs. ``backend`` is
    None for an open_clip model (its own ``encode_image`` / ``encode_text``); the image is
    resized to ``resize_px`` (default ``image_size``) with ``interpolation``, then
    centre-cropped to ``image_size``, as the model's published preprocessing does."""

    spec: ModelSpec
    model: Any
    device: str
    sha256: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    backend: Backend | None = None
    resize_px: int | None = None
    interpolation: str = "bicubic"

    @property
    def has_text(self) -> bool:
        return self.backend is None or self.backend.has_text

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale), clipped at 100 as in CLIP."""
        if self.backend is not None:
            return self.backend.logit_scale()
        return float(min(100.0, float(self.model.logit_scale.detach().exp().cpu())))

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (N, 3, S, S) -> the model's (N, D) image features, unnormalised."""
        return self.backend.image(x) if self.backend is not None else self.model.encode_image(x)

    @functools.cached_property
    def norm_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as float32 (1, 3, 1, 1) tensors on ``device``, made once
        (not per batch: building them on a GPU waits for the host)."""
        import torch

        with torch.inference_mode(False):  # plain tensors, even when first asked for in one
            m, s = (torch.tensor(v, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
                    for v in (self.mean, self.std))
        return m, s


def pathclip_weights(configured: str | None = None) -> str | None:
    """The PathCLIP checkpoint: the configured path, else ``$WSI_ASSIST_PATHCLIP``."""
    return configured or os.environ.get(PATHCLIP_ENV) or None


def parse_spec(spec: str, pathclip: str | None = None) -> ModelSpec:
    """Parse a model spec (see the module docstring); ``pathclip`` is the configured file."""
    from wsi_assist.models import encoders

    spec = spec.strip()
    folder_spec = encoders.parse_folder_spec(spec)
    if folder_spec is not None:
        return folder_spec
    if spec.startswith(HUB_PREFIX):
        return ModelSpec(spec=spec, arch=spec, hub=spec)
    if spec == "pathclip":
        weights = pathclip_weights(pathclip)
        if weights is None:
            raise ModelError("model 'pathclip' has no weights: set embed.pathclip, pass "
                             f"--pathclip PATH or set {PATHCLIP_ENV} to pathclip-base.pt")
        return ModelSpec(spec=spec, arch=PATHCLIP_ARCH, weights=Path(weights).expanduser(),
                         quick_gelu=True)
    arch, sep, path = spec.partition(":")
    if not sep or not path:
        raise ModelError(f"model spec {spec!r}: {encoders.VALID_SPECS}")
    if arch == "pathclip":
        return ModelSpec(spec=spec, arch=PATHCLIP_ARCH, weights=Path(path).expanduser(),
                         quick_gelu=True)
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelError(f"model spec {spec!r}: unknown open_clip architecture or model kind "
                         f"{arch!r} (see open_clip.list_models()); {encoders.VALID_SPECS}")
    return ModelSpec(spec=spec, arch=arch, weights=Path(path).expanduser())


def configured_spec(params: EmbedParams) -> ModelSpec | None:
    """The spec of the ``embed`` section, or None when PathCLIP has no weights anywhere."""
    if params.model.strip() == "pathclip" and pathclip_weights(params.pathclip) is None:
        return None
    return parse_spec(params.model, params.pathclip)


_SHA256S: FileCache[str] = FileCache()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each state of the file."""
    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    return _SHA256S.get("sha256", (path,), digest)


def spec_sha256(spec: ModelSpec) -> str:
    """The weights' SHA-256; for a hub model, the hash of its id (the files live in the
    hub cache and are versioned there)."""
    if spec.weights is not None:
        return file_sha256(spec.weights)
    return hashlib.sha256(spec.spec.encode()).hexdigest()


def read_state_dict(path: Path, arch: str, expected: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A plain state_dict from ``path`` (``weights_only=True``, or a ``.safetensors``
    file); ModelError when unreadable. ``expected`` says what it should hold."""
    import torch

    expected = expected or f"an open_clip {arch} state_dict"
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; expected {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot read (truncated or not a PyTorch checkpoint?); "
                         f"expected {expected}: {first}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path}: not a state_dict of tensors; expected {expected}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_state_dict(sd: dict[str, Any], model: Any, path: Path, arch: str,
                     what: str | None = None) -> None:
    """ModelError naming the file and architecture unless keys and shapes match exactly.
    ``what`` names the model in the message (default ``open_clip ARCH``)."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    shapes = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys ({_some(extra)})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches (e.g. {k!r}: file "
                        f"{tuple(sd[k].shape)}, {arch} expects {tuple(want[k].shape)})")
    if problems:
        raise ModelError(f"{path}: does not match {what or 'open_clip ' + arch}: "
                         + "; ".join(problems))


def _some(keys: list[str], n: int = 5) -> str:
    """The first ``n`` key names, quoted, and how many more."""
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return "e.g. " + ", ".join(repr(k) for k in keys[:n]) + more


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
        from wsi_assist.models import encoders

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


def open_clip_loaded(spec: ModelSpec, model: Any, device: str, sha: str) -> LoadedModel:
    """An open_clip model, its weights loaded, made ready on ``device``."""
    import open_clip
    import torch

    model = model.eval().to(torch.device(device))
    for p in model.parameters():
        p.requires_grad_(False)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    mean = tuple(float(v) for v in getattr(model.visual, "image_mean", None)
                 or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in getattr(model.visual, "image_std", None)
                or open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        dim = int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[1])
    log.info("loaded %s (%s) on %s, %d-d", spec.spec, spec.describe(), device, dim)
    return LoadedModel(spec=spec, model=model, device=device, sha256=sha, image_size=size,
                       mean=mean, std=std, embed_dim=dim)  # type: ignore[arg-type]


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
