"""ONNX sub-models per tile: sessions, preprocessing, the ``submodels`` stage.

One ``InferenceSession`` per model file and provider list per process, created on first
use and reused for every batch and slide. Tiles come from the slide's tile stream (read
once for all sub-models); each model sees only the tiles it runs on (all, or those whose
zero-shot class is listed in its spec). Findings go to ``slide.zarr/submodels/<name>``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_assist.errors import ModelError, StageSkipped, WsiAssistError
from wsi_assist.models.pathclip import file_sha256
from wsi_assist.models.submodel_decode import Accumulator, TileFrame
from wsi_assist.models.submodel_spec import SubmodelSpec, affine, check_against_model, load_spec

log = logging.getLogger(__name__)

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
BUILTIN = "nuclei-stain.yaml"


@dataclass(frozen=True)
class SubmodelParams:
    """Which sub-models run and where (config section ``submodels``)."""

    specs: tuple[str, ...] = (BUILTIN,)
    providers: tuple[str, ...] | None = None
    mpp_tolerance: float = 0.25

    def __post_init__(self) -> None:
        bad = [p for p in (self.providers or ()) if p not in PROVIDERS]
        if bad:
            raise ValueError(f"providers must be among {', '.join(PROVIDERS)}, got {bad[0]!r}")
        if self.providers is not None and not self.providers:
            raise ValueError("providers must list at least one provider, or be null (auto)")
        if not 0 <= self.mpp_tolerance < 1:
            raise ValueError(f"mpp_tolerance must be in [0, 1), got {self.mpp_tolerance!r}")


def builtin_dir() -> Path:
    """``configs/submodels`` of a source checkout, or the copy packaged in the wheel
    (next to ``configs/default.yaml``)."""
    from wsi_assist.config import default_config_path

    return default_config_path().parent / "submodels"


def resolve_spec_path(entry: str) -> Path:
    """A spec path as given; a bare file name not found here is looked up in the built-ins."""
    p = Path(entry).expanduser()
    if p.exists() or p.parent != Path("."):
        return p
    return builtin_dir() / p


def choose_providers(requested: tuple[str, ...] | None, device: str) -> list[str]:
    """onnxruntime providers: the requested ones (short names), else TensorRT, CUDA, CPU in
    that order when available (CPU only when the device is ``cpu``)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if requested is not None:
        chosen = [PROVIDERS[p] for p in requested]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise ModelError(f"onnxruntime provider {missing[0]!r} is not available here; "
                             f"available: {', '.join(sorted(available))}")
        return chosen
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [p for p in PROVIDERS.values() if p in available] or ["CPUExecutionProvider"]


_LOCK = threading.Lock()
_SUBMODELS: dict[tuple[Any, ...], Submodel] = {}


def get_submodel(spec_path: str | Path, providers: list[str]) -> Submodel:
    """The loaded, checked sub-model for this spec and providers, created once per process
    (and again only when the spec or model file changes)."""
    path = Path(spec_path).resolve()
    spec = load_spec(path)
    key = (str(path), _mtime(path), _mtime(spec.model_path), tuple(providers))
    with _LOCK:
        sub = _SUBMODELS.get(key)
        if sub is None:
            sub = Submodel.load(path, providers, spec=spec)
            _SUBMODELS[key] = sub
        return sub


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def clear_cache() -> None:
    """Forget cached sessions (tests, or after replacing model files)."""
    with _LOCK:
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


def select_rows(spec: SubmodelSpec, store: zarr.Group, n: int) -> np.ndarray:
    """Grid rows the sub-model runs on: all, or those whose zero-shot class is listed."""
    if spec.zeroshot_classes is None:
        return np.ones(n, bool)
    if "zeroshot" not in store or "top" not in store["zeroshot"]:
        raise WsiAssistError(f"sub-model {spec.name!r} runs on zero-shot classes "
                             f"{list(spec.zeroshot_classes)}; run the 'zeroshot' stage first")
    classes = list(store["zeroshot"].attrs["classes"])
    unknown = [c for c in spec.zeroshot_classes if c not in classes]
    if unknown:
        raise WsiAssistError(f"sub-model {spec.name!r}: zero-shot class {unknown[0]!r} is "
                             f"not among {classes}")
    wanted = [classes.index(c) for c in spec.zeroshot_classes]
    return np.isin(np.asarray(store["zeroshot/top"][...]), wanted)


def run_submodels(run: Any) -> dict[str, Any]:
    """The ``submodels`` stage: every configured sub-model over the slide's tiles."""

    params: SubmodelParams = run.config.submodels
    if not params.specs:
        raise StageSkipped("no sub-models configured; list spec files under submodels.specs")
    providers = choose_providers(params.providers, run.device)
    models = [get_submodel(resolve_spec_path(s), providers) for s in params.specs]
    grid = run.read_grid()
    background = run.store.attrs.get("tissue_background")
    active, summary = [], {}
    for m in models:
        want = m.spec.input.background
        if want != "any" and background is not None and background != want:
            why = f"needs a {want} background (bright-field); this slide's is {background}"
            _write_skip(run.store, m, why)
            summary[m.spec.name] = {"skipped": why}
            log.info("%s: sub-model %s not run: %s", run.slide_id, m.spec.name, why)
            continue
        active.append((m, select_rows(m.spec, run.store, len(grid))))
    if active:
        results = _run_models(run, grid, active, params)
        for (m, sel), acc in zip(active, results, strict=True):
            summary[m.spec.name] = _store_results(run, grid, m, sel, acc)
    return summary


def _run_models(run: Any, grid: Any, active: list[tuple[Submodel, np.ndarray]],
                params: SubmodelParams) -> list[Accumulator]:
    union = np.zeros(len(grid), bool)
    for _, sel in active:
        union |= sel
    rows = np.nonzero(union)[0]
    sub = dataclasses.replace(grid, coords=grid.coords[rows],
                              tissue_fraction=grid.tissue_fraction[rows])
    accs = [Accumulator(m.spec, len(grid), grid.mpp) for m, _ in active]
    sizes = [m.model_px(grid.tile_px, grid.delivered_mpp) for m, _ in active]
    _check_mpp(active, sizes, grid, params.mpp_tolerance)
    for batch in run.stream(sub):
        brows = rows[batch.index]
        for (m, sel), acc, size in zip(active, accs, sizes, strict=True):
            take = sel[brows]
            if not take.any():
                continue
            frame = TileFrame(grid.coords[brows[take]].astype(np.float64),
                              grid.size_l0 / size, size)
            acc.add(brows[take], m.run(m.prepare(batch.tiles[take], size)), frame)
    return accs


def _check_mpp(active: list[tuple[Submodel, np.ndarray]], sizes: list[int], grid: Any,
               tol: float) -> None:
    for (m, _), size in zip(active, sizes, strict=True):
        want = m.spec.input.mpp
        got = grid.delivered_mpp * grid.tile_px / size
        if want is not None and abs(got - want) > tol * want:
            log.warning("sub-model %s expects %.3g um/px, tiles give it %.3g um/px; results "
                        "may be off (set tiling.target_mpp or the spec's input.mpp)",
                        m.spec.name, want, got)


def _group(store: zarr.Group, name: str) -> zarr.Group:
    root = store.require_group("submodels")
    if name in root:
        del root[name]
    return root.create_group(name)


def _base_attrs(m: Submodel) -> dict[str, Any]:
    o = m.spec.output
    return {"task": m.spec.task, "classes": list(o.classes),
            "colors": [list(c) for c in o.colors], "model_path": str(m.spec.model_path),
            "model_sha256": m.sha256, "spec_path": str(m.spec.spec_path or "")}


def _write_skip(store: zarr.Group, m: Submodel, why: str) -> None:
    g = _group(store, m.spec.name)
    g.attrs.update({**_base_attrs(m), "counts": {}, "scores": {}, "skipped": why})


def _store_results(run: Any, grid: Any, m: Submodel, sel: np.ndarray,
                   acc: Accumulator) -> dict[str, Any]:
    from wsi_assist import store as store_mod

    stride_l0 = grid.stride_px * grid.level_downsample
    area_mm2 = float(grid.tissue_fraction[sel].sum()) * (stride_l0 * grid.mpp) ** 2 / 1e6
    arrays, attrs = acc.finish(area_mm2)
    g = _group(run.store, m.spec.name)
    o = m.spec.output
    for key, arr in arrays.items():
        extra = ({"measurement_names": list(o.measurement_names)}
                 if key == "measurements" else {})
        store_mod.write_array(g, key, arr, **extra)
    attrs.update(_base_attrs(m))
    attrs.update({"n_tiles_run": int(sel.sum()), "analysed_area_mm2": area_mm2,
                  "draw_radius_px": o.draw_radius_um / grid.mpp})
    if m.spec.task == "segmentation":
        attrs["geojson"] = _write_segmentation(run.out_dir, m, acc)
    g.attrs.update(attrs)
    return {"counts": attrs["counts"],
            "scores": {k: v["value"] for k, v in attrs["scores"].items()}}


def _write_segmentation(out_dir: Path, m: Submodel, acc: Accumulator) -> str:
    from wsi_assist import geojson

    o = m.spec.output
    rel = f"findings/{m.spec.name}.geojson"
    path = Path(out_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = (geojson.feature(poly, "annotation", classification=(o.classes[c], o.colors[c]),
                             measurements={"Area px^2": poly.area}, name=o.classes[c])
             for c, mp in sorted(acc.merged.items()) for poly in mp.geoms)
    geojson.write_features(path, feats)
    return rel

