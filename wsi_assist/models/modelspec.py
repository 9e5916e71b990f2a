"""What every model loader shares: the parsed spec, the loaded model, strict weights.

``ModelSpec`` says what to load, ``LoadedModel`` is a model ready on its device with its
published preprocessing; weights files are read with ``torch.load(weights_only=True)``
or safetensors and must match the model key for key and shape for shape.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from wsi_assist.errors import ModelError
from wsi_assist.files import FileCache

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
        kind = "" if self.kind == "open_clip" else f"{self.kind} "
        return f"{kind}{self.arch}{gelu} from {src}"

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


def read_state_dict(path: Path, arch: str, expected: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A plain state_dict from ``path`` (``weights_only=True``, or a ``.safetensors``
    file); ModelError when unreadable. ``expected`` says what it should hold."""
    import torch

    expected = expected or f"an open_clip {arch} state_dict"
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; expected {expected}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: Any
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            SafetensorError) as e:
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
