"""ONNX sub-models per tile: sessions, preprocessing, running them over a tile stream.

One ``InferenceSession`` per model file and provider list per process, created on first
use and reused for every batch and slide. Tiles come from the slide's tile stream (read
once for all sub-models); each model sees only the tiles it runs on (all, or those whose
zero-shot class is listed in its spec). The ``submodels`` stage stores what they find.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import ModelError, WsiAssistError
from wsi_assist.files import FileCache, configs_dir
from wsi_assist.models.pathclip import file_sha256
from wsi_assist.models.submodel_decode import Accumulator, TileFrame
from wsi_assist.models.submodel_spec import SubmodelSpec, affine, check_against_model, load_spec
from wsi_assist.stream import TileBatch
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}


def builtin_dir() -> Path:
    """``configs/submodels`` of a source checkout, or the copy packaged in the wheel."""
    return configs_dir() / "submodels"


def resolve_spec_path(entry: str) -> Path:
    """A spec path as given; a bare file name not found here is looked up in the built-ins."""
    p = Path(entry).expanduser()
    if p.exists() or p.parent != Path("."):
        return p
    return builtin_dir() / p


#: onnxruntime's library of each GPU provider (in ``onnxruntime/capi``): listed by
#: ``get_available_providers()`` whenever the wheel ships it, usable only when it loads
#: (its CUDA, cuDNN or TensorRT libraries are installed).
PROVIDER_LIBRARIES = {"TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
                      "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so"}
#: Providers already said to be left out (a warning once per process and provider).
_LEFT_OUT: set[str] = set()


def choose_providers(requested: tuple[str, ...] | None, device: str) -> list[str]:
    """onnxruntime providers: the requested ones (short names), else TensorRT, CUDA, CPU
    in that order (CPU only when the device is ``cpu``), keeping only those that exist
    here (:func:`usable_provider`), so that no session prints errors of a provider whose
    libraries are missing. A requested provider left out is said once in a warning;
    a ModelError when none of the requested ones exists."""
    if requested is None and device == "cpu":
        return ["CPUExecutionProvider"]
    wanted = [PROVIDERS[p] for p in requested] if requested is not None \
        else list(PROVIDERS.values())
    chosen = [p for p in wanted if usable_provider(p)]
    said = (p for p in wanted if p not in chosen
            and (requested is not None or p == "CUDAExecutionProvider"))
    for p in said:  # asked for, or what a CUDA device needs
        if p not in _LEFT_OUT:
            _LEFT_OUT.add(p)
            log.warning("onnxruntime provider %s left out: %s", p, provider_problem(p))
    if not chosen:
        raise ModelError(f"none of the onnxruntime providers {', '.join(wanted)} can run "
                         f"here: {provider_problem(wanted[0])}")
    return chosen


def usable_provider(name: str) -> bool:
    """Whether onnxruntime lists provider ``name`` and its library loads here."""
    return provider_problem(name) is None


@functools.cache
def provider_problem(name: str) -> str | None:
    """Why provider ``name`` cannot run here, in words (None: it can)."""
    import onnxruntime as ort

    if name not in ort.get_available_providers():
        return "not in this onnxruntime build (pip install onnxruntime-gpu for CUDA)"
    lib = PROVIDER_LIBRARIES.get(name)
    if lib is None:
        return None
    capi = Path(ort.__file__).parent / "capi"
    try:
        # what onnxruntime loads first, then the provider: its missing CUDA/TensorRT
        # libraries show here as one OSError instead of errors printed by each session
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / lib))
    except OSError as e:
        first = str(e).split(":", 1)[0] if ".so" in str(e) else str(e)
        return f"its libraries do not load ({first} missing)"
    return None


_SUBMODELS: FileCache[Submodel] = FileCache()


def get_submodel(spec_path: str | Path, providers: list[str]) -> Submodel:
    """The loaded, checked sub-model for this spec and providers, created once per process
    (and again only when the spec or model file changes)."""
    path = Path(spec_path).resolve()
    spec = load_spec(path)
    return _SUBMODELS.get((tuple(providers),), (path, spec.model_path),
                          lambda: Submodel.load(path, providers, spec=spec))


def clear_cache() -> None:
    """Forget cached sessions (tests, or after replacing model files)."""
    _SUBMODELS.clear()


class Submodel:
    """A spec and its InferenceSession (checked against each other by :meth:`load`)."""

    def __init__(self, spec: SubmodelSpec, session: Any, fused: Any = None) -> None:
        """``fused``: a session of the same model with preprocessing in its graph (uint8
        NHWC input, see :mod:`submodel_prefix`); used instead of ``session`` when given."""
        self.spec = spec
        self.fused = fused is not None
        self.session = fused if fused is not None else session
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.sha256 = file_sha256(spec.model_path)
        inp = spec.input
        shape = (1, 3, 1, 1) if inp.layout == "NCHW" else (1, 1, 1, 3)
        self._gain, self._bias = (a.reshape(shape) for a in affine(inp.mean, inp.std,
                                                                   inp.scale))

    @classmethod
    def load(cls, spec_path: Path, providers: list[str], fuse: bool = True,
             spec: SubmodelSpec | None = None) -> Submodel:
        """Load and check; float-input models get their preprocessing fused when ``fuse``.
        ``spec``: the spec already read from ``spec_path``, if it was."""
        from wsi_assist.models.submodel_prefix import fused_model

        if spec is None:
            spec = load_spec(spec_path)
        if spec.task == "promptable-segmentation":
            raise ModelError(f"{spec_path}: a promptable segmenter has an encoder and a "
                             f"decoder; load it with models.promptable.get_promptable")
        session = create_session(spec.model_path, providers)
        check_against_model(spec, session)
        blob = fused_model(spec.model_path, spec) if fuse else None
        fused = create_session(spec.model_path, providers, blob) if blob else None
        return cls(spec, session, fused)

    def model_px(self, grid_tile_px: int, delivered_mpp: float) -> int:
        """Input size for tiles of ``grid_tile_px`` at ``delivered_mpp``."""
        inp = self.spec.input
        if inp.tile_px is not None:
            return inp.tile_px
        if inp.mpp is None:
            return grid_tile_px
        return max(8, round(grid_tile_px * delivered_mpp / inp.mpp))

    def prepare(self, tiles: np.ndarray, size: int) -> np.ndarray:
        """uint8 (B,H,W,3) RGB tiles -> the model's input array."""
        inp = self.spec.input
        if tiles.shape[1] != size:
            from wsi_assist.stream import resize_tiles

            tiles = resize_tiles(tiles, size, np.empty((len(tiles), size, size, 3), np.uint8))
        if self.fused:
            return np.ascontiguousarray(tiles)
        if inp.channel_order == "BGR":
            tiles = tiles[..., ::-1]
        if inp.layout == "NCHW":
            tiles = tiles.transpose(0, 3, 1, 2)
        tiles = np.ascontiguousarray(tiles)  # a uint8 copy at most: cheap
        if inp.dtype == "uint8":
            return tiles
        # (v / scale - mean) / std as one multiply-add on float32, in place
        x = tiles.astype(np.float32)
        x *= self._gain
        x += self._bias
        return x.astype(inp.dtype, copy=False)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One session.run; outputs by name."""
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs, strict=True))


def create_session(model_path: Path, providers: list[str], model_bytes: bytes | None = None
                   ) -> Any:
    """An InferenceSession (of ``model_bytes`` when given, else of the file), refusing
    missing or unreadable model files with one line."""
    import onnxruntime as ort

    if not model_path.is_file():
        raise ModelError(f"{model_path}: sub-model file not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle intra-op threads sleep instead of spinning: the tile stream's decoding threads
    # (and other sessions) share the cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes or str(model_path), sess_options=opts,
                                    providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{model_path}: not a loadable ONNX model "
                         f"({str(e).splitlines()[0][:200]})") from e


def select_rows(spec: SubmodelSpec, n: int, classes: list[str] | None = None,
                top: np.ndarray | None = None) -> np.ndarray:
    """Grid rows the sub-model runs on: all, or those whose zero-shot class (``top``,
    indices into ``classes``) is listed in the spec."""
    if spec.zeroshot_classes is None:
        return np.ones(n, bool)
    if classes is None or top is None:
        raise WsiAssistError(f"sub-model {spec.name!r} runs on zero-shot classes "
                             f"{list(spec.zeroshot_classes)}; run the 'zeroshot' stage first")
    unknown = [c for c in spec.zeroshot_classes if c not in classes]
    if unknown:
        raise WsiAssistError(f"sub-model {spec.name!r}: zero-shot class {unknown[0]!r} is "
                             f"not among {classes}")
    return np.isin(top, [classes.index(c) for c in spec.zeroshot_classes])


def run_models(batches: Iterable[TileBatch], grid: TileGrid, rows: np.ndarray,
               active: list[tuple[Submodel, np.ndarray]], mpp_tolerance: float
               ) -> list[Accumulator]:
    """Every active (model, selected grid rows) over the stream of the grid's ``rows``;
    one accumulator of decoded findings per model."""
    accs = [Accumulator(m.spec, len(grid), grid.mpp) for m, _ in active]
    sizes = [m.model_px(grid.tile_px, grid.delivered_mpp) for m, _ in active]
    _check_mpp(active, sizes, grid, mpp_tolerance)
    for batch in batches:
        brows = rows[batch.index]
        for (m, sel), acc, size in zip(active, accs, sizes, strict=True):
            take = sel[brows]
            if not take.any():
                continue
            frame = TileFrame(grid.coords[brows[take]].astype(np.float64),
                              grid.size_l0 / size, size)
            acc.add(brows[take], m.run(m.prepare(batch.tiles[take], size)), frame)
    return accs


def _check_mpp(active: list[tuple[Submodel, np.ndarray]], sizes: list[int], grid: TileGrid,
               tol: float) -> None:
    for (m, _), size in zip(active, sizes, strict=True):
        want = m.spec.input.mpp
        got = grid.delivered_mpp * grid.tile_px / size
        if want is not None and abs(got - want) > tol * want:
            log.warning("sub-model %s expects %.3g um/px, tiles give it %.3g um/px; results "
                        "may be off (set tiling.target_mpp or the spec's input.mpp)",
                        m.spec.name, want, got)
