"""Sub-model specs: the YAML sidecar of an ONNX sub-model, and its check against the model.

A spec names the model file (relative to the YAML), its task, how tiles are fed to it
(``input``), how its outputs are read (``output``), which tiles it runs on (``tiles``)
and which slide scores are derived from its counts (``scores``). ONNX output names
expected per task: tile-classification and segmentation use the first output;
point-detection ``points`` (B,P,2) x,y tile px, ``scores`` (B,P), ``labels`` (B,P) and
optionally ``measurements`` (B,P,K); box-detection ``boxes`` (B,P,4) x0,y0,x1,y1,
``scores``, ``labels``. Padding rows carry a score below the threshold.

A detector whose graph ends in its raw head declares a ``decode`` step instead, run by
the runtime (:mod:`submodel_decode`): ``yolov5`` (YOLOv5/v7, one output (B,N,5+nc):
x,y,w,h in tile px, objectness, class scores), ``yolov8`` (YOLOv8 and later, (B,4+nc,N):
x,y,w,h, class scores), both decoded with class-aware NMS per tile; ``p2pnet``
(``pred_logits`` (B,N,K+1), ``pred_points`` (B,N,2) x,y tile px: softmax, background
class dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_assist.errors import ModelError
from wsi_assist.files import read_yaml

Task = Literal["tile-classification", "point-detection", "box-detection", "segmentation"]
TASKS = ("tile-classification", "point-detection", "box-detection", "segmentation")
DETECTION_OUTPUTS = {"point-detection": ("points", "scores", "labels"),
                     "box-detection": ("boxes", "scores", "labels")}
HEAD_OUTPUTS = {"yolov5": ("output0",), "yolov8": ("output0",),
                "p2pnet": ("pred_logits", "pred_points")}
HEAD_TASKS = {"yolov5": "box-detection", "yolov8": "box-detection",
              "p2pnet": "point-detection"}
ONNX_DTYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)", "float16": "tensor(float16)"}


@dataclass(frozen=True)
class InputSpec:
    """How tiles are fed: size (None = any), mpp, channels, normalisation, layout, dtype."""

    tile_px: int | None = 224
    mpp: float | None = 0.5
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["uint8", "float32", "float16"] = "float32"
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    background: Literal["bright", "dark", "any"] = "any"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.tile_px is not None and self.tile_px < 8:
            raise ValueError(f"tile_px must be >= 8 or null, got {self.tile_px!r}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be > 0 or null, got {self.mpp!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.dtype not in ONNX_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(ONNX_DTYPES)}, got {self.dtype!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 values, std > 0; got {self.mean!r}, "
                             f"{self.std!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        if self.background not in ("bright", "dark", "any"):
            raise ValueError(f"background must be bright, dark or any, got {self.background!r}")


@dataclass(frozen=True)
class OutputSpec:
    """How outputs are decoded: classes, colours, thresholds, de-duplication."""

    classes: tuple[str, ...] = ()
    colors: tuple[tuple[int, int, int], ...] = ()
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    score_threshold: float = 0.5
    nms_radius_um: float = 4.0
    iou_threshold: float = 0.5
    background_index: int | None = 0
    min_area_um2: float = 0.0
    measurement_names: tuple[str, ...] = ()
    draw_radius_um: float = 3.0

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {list(self.classes)!r}")
        if len(self.colors) != len(self.classes) or any(
                len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.colors):
            raise ValueError(f"colors must give one [r, g, b] (0..255) per class, got "
                             f"{[list(c) for c in self.colors]!r}")
        if self.activation not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"activation must be softmax, sigmoid or none, got "
                             f"{self.activation!r}")
        if self.nms_radius_um < 0 or not 0 < self.iou_threshold <= 1:
            raise ValueError("nms_radius_um must be >= 0 and iou_threshold in (0, 1]")
        if self.background_index is not None and not 0 <= self.background_index < len(
                self.classes):
            raise ValueError(f"background_index must index classes, got "
                             f"{self.background_index!r}")


@dataclass(frozen=True)
class ScoreSpec:
    """A slide score from counts: ratio (numerator / denominator) or density (per mm^2)."""

    kind: Literal["ratio", "density"]
    definition: str
    numerator: tuple[str, ...] = ()
    denominator: tuple[str, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "density"):
            raise ValueError(f"kind must be ratio or density, got {self.kind!r}")
        if not self.numerator or (self.kind == "ratio" and not self.denominator):
            raise ValueError("numerator (and for a ratio, denominator) must list classes")
        if not self.definition.strip():
            raise ValueError("definition must say what the score means")


@dataclass(frozen=True)
class DecodeSpec:
    """A declared decode step from a raw detection head to the task's standard outputs.

    ``outputs``: the ONNX output names of the head, in :data:`HEAD_OUTPUTS` order;
    ``max_detections``: per tile, after NMS; ``activation``: applied to YOLO
    objectness/class scores (``none``: the graph already gives probabilities, as
    YOLOv5/v7/v8 exports do); ``background``: where P2PNet's background logit is
    (``last``, DETR style; ``first``, the original crowd-counting P2PNet)."""

    head: Literal["yolov5", "yolov8", "p2pnet"]
    outputs: tuple[str, ...] = ()
    max_detections: int = 300
    activation: Literal["none", "sigmoid"] = "none"
    background: Literal["first", "last"] = "last"

    def __post_init__(self) -> None:
        if self.head not in HEAD_OUTPUTS:
            raise ValueError(f"decode.head must be one of {tuple(HEAD_OUTPUTS)}, got "
                             f"{self.head!r}")
        want = len(HEAD_OUTPUTS[self.head])
        if self.outputs and len(self.outputs) != want:
            raise ValueError(f"decode.outputs must name {want} output(s) for {self.head} "
                             f"{list(HEAD_OUTPUTS[self.head])}, got {list(self.outputs)}")
        if self.max_detections < 1:
            raise ValueError(f"decode.max_detections must be >= 1, got {self.max_detections}")
        if self.activation not in ("none", "sigmoid"):
            raise ValueError(f"decode.activation must be none or sigmoid, got "
                             f"{self.activation!r}")
        if self.background not in ("first", "last"):
            raise ValueError(f"decode.background must be first or last, got "
                             f"{self.background!r}")

    @property
    def output_names(self) -> tuple[str, ...]:
        """The head's ONNX output names (declared, else the defaults)."""
        return self.outputs or HEAD_OUTPUTS[self.head]


def decode_from_dict(data: Any) -> DecodeSpec | None:
    """The ``decode`` section of a spec (a mapping, or just the head's name)."""
    if data is None:
        return None
    if isinstance(data, str):
        data = {"head": data}
    if not isinstance(data, dict):
        raise TypeError(f"decode must be a mapping or a head name, got {data!r}")
    d = dict(data)
    d["outputs"] = tuple(str(o) for o in d.get("outputs", ()))
    if "max_detections" in d:
        d["max_detections"] = int(d["max_detections"])
    return DecodeSpec(**d)


def check_head_outputs(spec: SubmodelSpec, dec: DecodeSpec, outputs: list[Any], where: str
                       ) -> None:
    """Refuse a model whose outputs do not fit the spec's declared decode head ``dec``."""
    names = [o.name for o in outputs]
    need = dec.output_names
    if any(n not in names for n in need):
        raise ModelError(f"{where}: decode head {dec.head} needs outputs {list(need)}, "
                         f"model has {names}")
    shapes = [list(outputs[names.index(n)].shape) for n in need]
    n = len(spec.output.classes)
    want = {"yolov5": [(-1, 5 + n)], "yolov8": [(1, 4 + n)],
            "p2pnet": [(-1, n + 1), (-1, 2)]}[dec.head]
    for name, shape, (axis, size) in zip(need, shapes, want, strict=True):
        if len(shape) != 3:
            raise ModelError(f"{where}: decode head {dec.head} expects 3-d output {name!r}, "
                             f"model's is {shape}")
        if isinstance(shape[axis], int) and shape[axis] != size:
            raise ModelError(f"{where}: decode head {dec.head} with {n} classes expects "
                             f"{size} on axis {axis % 3} of {name!r}, model's shape is "
                             f"{shape}")


@dataclass(frozen=True)
class SubmodelSpec:
    """A sub-model: ONNX file plus everything needed to run and read it."""

    name: str
    task: Task
    model_path: Path
    input: InputSpec
    output: OutputSpec
    zeroshot_classes: tuple[str, ...] | None = None
    scores: dict[str, ScoreSpec] = field(default_factory=dict)
    spec_path: Path | None = None
    decode: DecodeSpec | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name[0] == "." or not all(
                c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.decode is not None and HEAD_TASKS[self.decode.head] != self.task:
            raise ValueError(f"decode head {self.decode.head} gives "
                             f"{HEAD_TASKS[self.decode.head]}, not {self.task}")
        known = set(self.output.classes)
        for sname, s in self.scores.items():
            bad = [c for c in (*s.numerator, *s.denominator) if c not in known]
            if bad:
                raise ValueError(f"scores: {sname!r} names unknown class {bad[0]!r}")


def affine(mean: Any, std: Any, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(v / scale - mean) / std`` as one multiply-add ``v * gain + bias``: float32
    ``gain = 1 / (scale * std)`` and ``bias = -mean / std``, one value per channel."""
    std, mean = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    return 1.0 / (np.float32(scale) * std), -mean / std


def load_spec(path: str | Path) -> SubmodelSpec:
    """Read and validate a spec YAML; ``model`` is resolved next to the YAML file."""
    path = Path(path)
    data = read_yaml(path, "sub-model spec", ModelError)
    if not isinstance(data, dict):
        raise ModelError(f"{path}: a sub-model spec must be a mapping")
    try:
        return spec_from_dict(data, path.parent, path)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{path}: invalid sub-model spec: {e}") from e


def spec_from_dict(data: dict[str, Any], base: Path, spec_path: Path | None = None
                   ) -> SubmodelSpec:
    """Build a spec from a plain dict (as read from YAML)."""
    allowed = {"name", "task", "model", "input", "output", "tiles", "scores", "description",
               "model_params", "decode"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown key {min(unknown)!r}; valid: {sorted(allowed)}")
    for key in ("name", "task", "model", "output"):
        if key not in data:
            raise ValueError(f"missing key {key!r}")
    inp = dict(data.get("input") or {})
    for k in ("mean", "std"):
        if k in inp:
            inp[k] = tuple(float(v) for v in inp[k])
    out = dict(data["output"])
    out["classes"] = tuple(str(c) for c in out.get("classes", ()))
    out["colors"] = tuple(tuple(int(v) for v in c) for c in out.get("colors", ()))
    out["measurement_names"] = tuple(out.get("measurement_names", ()))
    tiles = data.get("tiles") or {}
    zs = tiles.get("zeroshot_classes")
    scores = {str(k): ScoreSpec(kind=v["kind"], definition=str(v["definition"]),
                                numerator=tuple(v.get("numerator", ())),
                                denominator=tuple(v.get("denominator", ())),
                                scale=float(v.get("scale", 1.0)))
              for k, v in (data.get("scores") or {}).items()}
    return SubmodelSpec(name=str(data["name"]), task=data["task"],
                        model_path=(base / str(data["model"])).resolve(),
                        input=InputSpec(**inp), output=OutputSpec(**out),
                        zeroshot_classes=tuple(zs) if zs else None, scores=scores,
                        spec_path=spec_path, decode=decode_from_dict(data.get("decode")))


def check_against_model(spec: SubmodelSpec, session: Any) -> None:
    """Refuse (ModelError) a spec whose inputs or outputs contradict the ONNX model's."""
    where = f"{spec.model_path}"
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{where}: expected 1 input (tiles), model has {len(inputs)}")
    inp = inputs[0]
    if spec.input.name is not None and inp.name != spec.input.name:
        raise ModelError(f"{where}: spec input name {spec.input.name!r}, model has {inp.name!r}")
    if inp.type != ONNX_DTYPES[spec.input.dtype]:
        raise ModelError(f"{where}: spec says input dtype {spec.input.dtype}, model takes "
                         f"{inp.type}")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelError(f"{where}: expected a 4-d image input, model input shape is {shape}")
    c_axis, hw = (1, shape[2:4]) if spec.input.layout == "NCHW" else (3, shape[1:3])
    if isinstance(shape[c_axis], int) and shape[c_axis] != 3:
        raise ModelError(f"{where}: spec layout {spec.input.layout} puts channels on axis "
                         f"{c_axis}, but the model input shape is {shape}")
    for d in hw:
        if isinstance(d, int) and d != spec.input.tile_px:
            raise ModelError(f"{where}: spec input tile_px {spec.input.tile_px}, model input "
                             f"shape is {shape}")
    _check_outputs(spec, session.get_outputs(), where)


def _check_outputs(spec: SubmodelSpec, outputs: list[Any], where: str) -> None:
    if spec.decode is not None:
        check_head_outputs(spec, spec.decode, outputs, where)
        return
    names = [o.name for o in outputs]
    n = len(spec.output.classes)
    if spec.task in DETECTION_OUTPUTS:
        need = DETECTION_OUTPUTS[spec.task]
        missing = [k for k in need if k not in names]
        if missing:
            raise ModelError(f"{where}: {spec.task} needs outputs {list(need)}, model has "
                             f"{names}")
        if "measurements" in names and spec.output.measurement_names:
            k = outputs[names.index("measurements")].shape[-1]
            if isinstance(k, int) and k != len(spec.output.measurement_names):
                raise ModelError(f"{where}: spec names {len(spec.output.measurement_names)} "
                                 f"measurements, model outputs {k}")
        return
    shape = list(outputs[0].shape)
    want = 2 if spec.task == "tile-classification" else 4
    if len(shape) != want:
        raise ModelError(f"{where}: {spec.task} expects a {want}-d first output, model's "
                         f"{names[0]!r} is {shape}")
    if isinstance(shape[1], int) and shape[1] != n:
        raise ModelError(f"{where}: spec lists {n} classes, model output {names[0]!r} has "
                         f"{shape[1]} (shape {shape})")
