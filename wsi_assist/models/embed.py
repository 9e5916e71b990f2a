"""Image encoders over a slide's tile stream, for the ``embed`` stage.

Two engines share one loop. ``torch`` preprocesses on the device (pinned host memory and
non-blocking copies on CUDA, bf16/fp16 autocast) and keeps one batch in flight, so the
stream reads batch i+1 while the GPU computes batch i. ``onnx`` runs an image encoder
exported by ``exporters.pathclip_onnx`` through onnxruntime (CUDA provider, then CPU).
Results: ``embeddings`` (N, D) float16, L2-normalised, rows aligned with ``coords``, and
on request the model's own unnormalised float32 features (for MIL feature files).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wsi_assist.errors import ModelError, WsiAssistError
from wsi_assist.files import FileCache
from wsi_assist.models.pathclip import (
    LoadedModel,
    ModelSpec,
    encode_images,
    load_model,
    preprocess,
    spec_sha256,
)
from wsi_assist.settings import EmbedParams
from wsi_assist.stream import TileBatch

log = logging.getLogger(__name__)

ONNX_META = "wsi_assist."
#: Tiles of the batch a CUDA encoder runs once before its first real one.
WARM_UP_TILES = 8


class Encoder(Protocol):
    """Submit a batch of uint8 tiles; fetch its (N, D) float32 features later: the model's
    own output (unnormalised), or normalised ones where ``normalised`` says so."""

    sha256: str
    embed_dim: int
    normalised: bool

    def submit(self, tiles: np.ndarray) -> Any: ...

    def fetch(self, handle: Any) -> np.ndarray: ...


class TorchEncoder:
    """A loaded model's image tower on its device. On CUDA one small batch is run
    first, so that the first batch of a pass does not pay for the context, the
    libraries' handles and the kernels being loaded (up to a second)."""

    normalised = False

    def __init__(self, lm: LoadedModel, precision: str = "auto") -> None:
        self.lm, self.precision = lm, precision
        self.sha256, self.embed_dim = lm.sha256, lm.embed_dim
        self.cuda = lm.device.startswith("cuda")
        if self.cuda:
            self.fetch(self.submit(np.zeros((WARM_UP_TILES, lm.image_size, lm.image_size,
                                             3), np.uint8)))

    def submit(self, tiles: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.cuda:
            t = t.pin_memory().to(self.lm.device, non_blocking=True)
        return encode_images(self.lm, t, self.precision, raw=True)

    def fetch(self, handle: Any) -> np.ndarray:
        return handle.cpu().numpy()


class OnnxEncoder:
    """An exported image encoder (input ``pixel_values``, output normalised embeddings)."""

    normalised = True

    def __init__(self, path: Path, device: str, expect_sha256: str | None = None) -> None:
        self.session = ort_session(path, device)
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.image_size = int(meta[ONNX_META + "image_size"])
            self.mean = tuple(float(v) for v in meta[ONNX_META + "mean"].split(","))
            self.std = tuple(float(v) for v in meta[ONNX_META + "std"].split(","))
            self.sha256 = meta[ONNX_META + "source_sha256"]
            self.embed_dim = int(meta[ONNX_META + "embed_dim"])
        except (KeyError, ValueError) as e:
            raise ModelError(f"{path}: not an image encoder exported by "
                             f"exporters.pathclip_onnx (metadata {e} missing)") from e
        if expect_sha256 is not None and self.sha256 != expect_sha256:
            raise ModelError(f"{path}: exported from weights {self.sha256[:12]}, but the "
                             f"configured model is {expect_sha256[:12]}; re-export it")

    def submit(self, tiles: np.ndarray) -> Any:
        import torch

        x = preprocess(torch.from_numpy(np.ascontiguousarray(tiles)), self.image_size,
                       self.mean, self.std)
        return self.session.run(None, {"pixel_values": x.numpy()})[0]

    def fetch(self, handle: Any) -> np.ndarray:
        return np.asarray(handle, dtype=np.float32)


def ort_session(path: Path, device: str) -> Any:
    """An onnxruntime session: CUDA then CPU providers on a GPU device, CPU otherwise."""
    import onnxruntime as ort

    from wsi_assist.models.submodels import usable_provider

    if not Path(path).is_file():
        raise ModelError(f"{path}: ONNX image encoder not found; export one with "
                         "`python -m exporters.pathclip_onnx SPEC -o FILE`")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and usable_provider("CUDAExecutionProvider"):
        dev_id = int(device.split(":")[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev_id}))  # type: ignore
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: onnxruntime cannot load it (truncated or not ONNX?): "
                         f"{e}") from e


_ONNX_ENCODERS: FileCache[OnnxEncoder] = FileCache()


def make_encoder(spec: ModelSpec, params: EmbedParams, device: str) -> Encoder:
    """The configured engine for ``spec`` on ``device``. ONNX encoders (sessions) are made
    once per process for a file, device and expected weights, and again only when the
    file changes."""
    if params.engine == "onnx":
        if not params.onnx:
            raise ModelError("embed.engine is 'onnx' but embed.onnx is not set; export the "
                             "encoder with `python -m exporters.pathclip_onnx SPEC -o FILE`")
        path, sha = Path(params.onnx), spec_sha256(spec)
        return _ONNX_ENCODERS.get((device, sha), (path,),
                                  lambda: OnnxEncoder(path, device, expect_sha256=sha))
    return TorchEncoder(load_model(spec, device), params.precision)


def used_precision(params: EmbedParams, device: str) -> str:
    """What the arithmetic really was: fp32 on CPU and in onnxruntime, else autocast."""
    from wsi_assist.models.pathclip import autocast_dtype

    if params.engine == "onnx":
        return "fp32"
    dtype = autocast_dtype(params.precision, device)
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace(
        "bfloat16", "bf16").replace("float16", "fp16")


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings of a whole grid (and the model's own features, when kept) and where
    the time went."""

    embeddings: np.ndarray
    seconds: float
    input_wait_s: float
    features: np.ndarray | None = None

    @property
    def tiles_per_s(self) -> float:
        return len(self.embeddings) / self.seconds if self.seconds > 0 else 0.0


def embed_batches(encoder: Encoder, batches: Iterable[TileBatch], n: int,
                  keep_features: bool = False) -> EmbedResult:
    """Run ``encoder`` over the batches with one batch in flight; every row must arrive.
    ``keep_features``: also return the encoder's float32 output as it came."""
    out = np.zeros((n, encoder.embed_dim), np.float16)
    feats = np.zeros((n, encoder.embed_dim), np.float32) if keep_features else None
    seen = np.zeros(n, bool)

    def put(rows: np.ndarray, handle: Any) -> None:
        f = encoder.fetch(handle)
        if feats is not None:
            feats[rows] = f
        out[rows] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    pending: tuple[np.ndarray, Any] | None = None
    it = iter(batches)
    wait = 0.0
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        handle = encoder.submit(batch.tiles)
        if pending is not None:
            put(*pending)
        pending = (batch.index, handle)
        seen[batch.index] = True
    if pending is not None:
        put(*pending)
    if not seen.all():
        raise WsiAssistError(f"tile stream delivered {int(seen.sum())} of {n} tiles")
    return EmbedResult(out, time.perf_counter() - t_start, wait, feats)
