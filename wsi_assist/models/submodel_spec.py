"""Sub-model specs: the YAML sidecar of an ONNX sub-model, and its check against the model.

A spec names the model file (relative to the YAML), its task, how tiles are fed to it
(``input``), how its outputs are read (``output``), which tiles it runs on (``tiles``)
and which slide scores are derived from its counts (``scores``). ONNX output names
expected per task: tile-classification and segmentation use the first output;
point-detection ``points`` (B,P,2) x,y tile px, ``scores`` (B,P), ``labels`` (B,P) and
optionally ``measurements`` (B,P,K); box-detection ``boxes`` (B,P,4) x0,y0,x1,y1,
``scores``, ``labels``. Padding rows carry a score below the threshold.
promptable-segmentation (SAM-style): ``encoder`` names an image encoder (one image input,
first output the image embedding) and ``model`` its prompt decoder with SAM's ONNX
export signature (``DECODER_INPUTS`` -> ``DECODER_OUTPUTS``); ``prompts`` names the
sub-model whose detections are the point prompts.

A detector whose graph ends in its raw head declares a ``decode`` step instead, run by
the runtime (:mod:`submodel_decode`): ``yolov5`` and ``yolov7`` (one output (B,N,5+nc):
x,y,w,h in tile px, objectness, class scores; they differ only in scoring a one-class
model), ``yolov8`` (YOLOv8 and later, (B,4+nc,N):
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

Task = Literal["tile-classification", "point-detection", "box-detection", "segmentation",
               "promptable-segmentation"]
TASKS = ("tile-classification", "point-detection", "box-detection", "segmentation",
         "promptable-segmentation")
DETECTION_OUTPUTS = {"point-detection": ("points", "scores", "labels"),
                     "box-detection": ("boxes", "scores", "labels")}
#: SAM's ONNX export of its prompt decoder (segment_anything/utils/onnx.py), by name.
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
                  "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
#: default ONNX output names per head, as each project's exporter names them
HEAD_OUTPUTS = {"yolov5": ("output0",), "yolov7": ("output",), "yolov8": ("output0",),
                "p2pnet": ("pred_logits", "pred_points")}
HEAD_TASKS = {"yolov5": "box-detection", "yolov7": "box-detection",
              "yolov8": "box-detection", "p2pnet": "point-detection"}
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
    simplify_um: float = 0.25  # segmentation outlines: Douglas-Peucker tolerance, um

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
        if not self.simplify_um >= 0:
            raise ValueError(f"simplify_um must be >= 0, got {self.simplify_um!r}")
        if self.background_index is not None and not 0 <= self.background_index < len(
                self.classes):
            raise ValueError(f"background_index must index classes, got "
                             f"{self.background_index!r}")


SCORE_KINDS = ("ratio", "density", "cps", "hscore", "categorical")
RULE_OPS = (">", ">=", "<", "<=")


@dataclass(frozen=True)
class RuleCondition:
    """``percent`` of the score's denominator cells in ``classes`` compared by ``op``."""

    classes: tuple[str, ...]
    op: str
    percent: float

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a rule condition must list classes")
        if self.op not in RULE_OPS:
            raise ValueError(f"rule op {self.op!r} unknown; valid: {list(RULE_OPS)}")
        if not 0 <= self.percent <= 100:
            raise ValueError(f"rule percent must be in 0..100, got {self.percent!r}")

    def text(self) -> str:
        return f"{' + '.join(self.classes)} {self.op} {self.percent:g} %"


@dataclass(frozen=True)
class ScoreRule:
    """One category of a categorical score: its rule in words and the conditions (all
    must hold; none = the category otherwise)."""

    category: str
    rule: str
    when: tuple[RuleCondition, ...] = ()

    def __post_init__(self) -> None:
        if not str(self.category).strip() or not self.rule.strip():
            raise ValueError("each rule needs a category and its rule text")


@dataclass(frozen=True)
class ScoreSpec:
    """A slide score from class counts. ``ratio``: numerator / denominator x scale;
    ``density``: numerator per mm^2 x scale; ``cps``: combined positive score, numerator
    / denominator x 100 capped at 100; ``hscore``: sum of weight x % of denominator cells
    per class (``weights``, e.g. 1+ 1, 2+ 2, 3+ 3: 0..300); ``categorical``: the first of
    ``rules`` whose conditions hold (percentages of denominator cells)."""

    kind: Literal["ratio", "density", "cps", "hscore", "categorical"]
    definition: str
    numerator: tuple[str, ...] = ()
    denominator: tuple[str, ...] = ()
    scale: float = 1.0
    cap: float | None = None
    weights: tuple[tuple[str, float], ...] = ()
    rules: tuple[ScoreRule, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f"kind must be one of {list(SCORE_KINDS)}, got {self.kind!r}")
        if self.kind in ("ratio", "density", "cps") and (
                not self.numerator or (self.kind != "density" and not self.denominator)):
            raise ValueError(f"a {self.kind} score needs numerator"
                             f"{'' if self.kind == 'density' else ' and denominator'} classes")
        if self.kind in ("hscore", "categorical") and not self.denominator:
            raise ValueError(f"a {self.kind} score needs denominator classes")
        if self.kind == "hscore" and not self.weights:
            raise ValueError("an hscore needs weights (class: intensity 1, 2 or 3)")
        if self.kind == "categorical" and not self.rules:
            raise ValueError("a categorical score needs rules")
        if not self.definition.strip():
            raise ValueError("definition must say what the score means")

    def class_names(self) -> list[str]:
        """Every class the score names, in the order given."""
        rule_classes = [c for r in self.rules for w in r.when for c in w.classes]
        return [*self.numerator, *self.denominator, *(c for c, _ in self.weights),
                *rule_classes]


def score_from_dict(name: str, v: dict[str, Any]) -> ScoreSpec:
    """A score of a spec's ``scores`` mapping, as read from YAML."""
    if not isinstance(v, dict):
        raise TypeError(f"scores: {name!r} must be a mapping")
    allowed = {"kind", "definition", "numerator", "denominator", "scale", "cap", "weights",
               "rules"}
    unknown = set(v) - allowed
    if unknown:
        raise ValueError(f"scores: {name!r} has unknown key {min(unknown)!r}; valid: "
                         f"{sorted(allowed)}")
    rules = tuple(_rule(name, r) for r in _listed(v.get("rules"), f"scores: {name!r} rules"))
    weights = v.get("weights") or {}
    if not isinstance(weights, dict):
        raise TypeError(f"scores: {name!r} weights must map class -> weight, got {weights!r}")
    if "kind" not in v:
        raise ValueError(f"scores: {name!r} needs a kind; valid: {list(SCORE_KINDS)}")
    return ScoreSpec(kind=v["kind"], definition=str(v.get("definition", "")),
                     numerator=tuple(str(c) for c in v.get("numerator", ())),
                     denominator=tuple(str(c) for c in v.get("denominator", ())),
                     scale=float(v.get("scale", 1.0)),
                     cap=None if v.get("cap") is None else float(v["cap"]),
                     weights=tuple((str(c), float(w)) for c, w in weights.items()),
                     rules=rules)


def _listed(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise TypeError(f"{what} must be a list of mappings, got {value!r}")
    return value


def _rule(score: str, r: dict[str, Any]) -> ScoreRule:
    """One rule of a categorical score: category, rule (text), when (conditions)."""
    unknown = set(r) - {"category", "rule", "when"}
    if unknown:
        raise ValueError(f"scores: {score!r} rule has unknown key {min(unknown)!r}; valid: "
                         f"['category', 'rule', 'when']")
    when = []
    for w in _listed(r.get("when"), f"scores: {score!r} rule 'when'"):
        if "percent" not in w:
            raise ValueError(f"scores: {score!r} rule condition {w!r} needs percent")
        when.append(RuleCondition(classes=tuple(str(c) for c in w.get("classes") or ()),
                                  op=str(w.get("op", ">")), percent=float(w["percent"])))
    return ScoreRule(category=str(r.get("category", "")), rule=str(r.get("rule", "")),
                     when=tuple(when))


@dataclass(frozen=True)
class PromptSpec:
    """Prompts of a promptable segmenter: the detections of sub-model ``source`` (e.g.
    the built-in ``nuclei``), optionally only its ``classes``, at most ``max_per_tile``
    (highest-scored first) per tile; each tile is read with ``halo_um`` of context
    around it so that cells on its border are outlined whole."""

    source: str
    classes: tuple[str, ...] | None = None
    max_per_tile: int = 512
    halo_um: float = 8.0

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("prompts.source must name the sub-model whose detections "
                             "prompt this one")
        if self.max_per_tile < 1:
            raise ValueError(f"prompts.max_per_tile must be >= 1, got {self.max_per_tile!r}")
        if not self.halo_um >= 0:
            raise ValueError(f"prompts.halo_um must be >= 0, got {self.halo_um!r}")


@dataclass(frozen=True)
class DecodeSpec:
    """A declared decode step from a raw detection head to the task's standard outputs.

    ``outputs``: the ONNX output names of the head, in :data:`HEAD_OUTPUTS` order;
    ``max_detections``: per tile, after NMS; ``activation``: applied to YOLO
    objectness/class scores (``none``: the graph already gives probabilities, as
    YOLOv5/v7/v8 exports do); ``background``: where P2PNet's background logit is
    (``last``, DETR style; ``first``, the original crowd-counting P2PNet)."""

    head: Literal["yolov5", "yolov7", "yolov8", "p2pnet"]
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


def head_axes(head: str, n_classes: int) -> list[tuple[int, int]]:
    """(axis, size) that each of ``head``'s 3-d outputs must have, for ``n_classes``."""
    n = n_classes
    return {"yolov5": [(2, 5 + n)], "yolov7": [(2, 5 + n)], "yolov8": [(1, 4 + n)],
            "p2pnet": [(2, n + 1), (2, 2)]}[head]


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
    for name, shape, (axis, size) in zip(need, shapes, head_axes(dec.head, n), strict=True):
        if len(shape) != 3:
            raise ModelError(f"{where}: decode head {dec.head} expects 3-d output {name!r}, "
                             f"model's is {shape}")
        if isinstance(shape[axis], int) and shape[axis] != size:
            raise ModelError(f"{where}: decode head {dec.head} with {n} classes expects "
                             f"{size} on axis {axis} of {name!r}, model's shape is "
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
    encoder_path: Path | None = None  # promptable-segmentation: the image encoder
    prompts: PromptSpec | None = None  # promptable-segmentation: where prompts come from
    decode: DecodeSpec | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name[0] == "." or not all(
                c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        promptable = self.task == "promptable-segmentation"
        if promptable != (self.encoder_path is not None) or promptable != (
                self.prompts is not None):
            raise ValueError("encoder and prompts are for task promptable-segmentation, "
                             "which needs both" if promptable else
                             f"encoder and prompts are only for promptable-segmentation, "
                             f"not {self.task}")
        if self.decode is not None and HEAD_TASKS[self.decode.head] != self.task:
            raise ValueError(f"decode head {self.decode.head} gives "
                             f"{HEAD_TASKS[self.decode.head]}, not {self.task}")
        known = set(self.output.classes)
        for sname, s in self.scores.items():
            bad = [c for c in s.class_names() if c not in known]
            if bad:
                raise ValueError(f"scores: {sname!r} names unknown class {bad[0]!r}; "
                                 f"valid: {list(self.output.classes)}")


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
               "model_params", "encoder", "prompts",
               "decode"}
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
    scores = {str(k): score_from_dict(str(k), v) for k, v in (data.get("scores") or {}).items()}
    return SubmodelSpec(name=str(data["name"]), task=data["task"],
                        model_path=(base / str(data["model"])).resolve(),
                        input=InputSpec(**inp), output=OutputSpec(**out),
                        zeroshot_classes=tuple(zs) if zs else None, scores=scores,
                        spec_path=spec_path, decode=decode_from_dict(data.get("decode")),
                        encoder_path=(base / str(data["encoder"])).resolve()
                        if data.get("encoder") else None,
                        prompts=_prompts(data.get("prompts")))


def _prompts(p: Any) -> PromptSpec | None:
    if p is None:
        return None
    if not isinstance(p, dict):
        raise TypeError("prompts must be a mapping (source, classes, max_per_tile)")
    unknown = set(p) - {"source", "classes", "max_per_tile", "halo_um"}
    if unknown:
        raise ValueError(f"prompts: unknown key {min(unknown)!r}; valid: "
                         f"['classes', 'halo_um', 'max_per_tile', 'source']")
    classes = p.get("classes")
    if classes is not None and not isinstance(classes, list):
        raise TypeError(f"prompts.classes must be a list of class names, got {classes!r}")
    return PromptSpec(source=str(p.get("source", "")),
                      classes=tuple(str(c) for c in classes) if classes else None,
                      max_per_tile=int(p.get("max_per_tile", 512)),
                      halo_um=float(p.get("halo_um", 8.0)))


def check_against_model(spec: SubmodelSpec, session: Any) -> None:
    """Refuse (ModelError) a spec whose inputs or outputs contradict the ONNX model's.
    For a promptable segmenter ``session`` is its prompt decoder (its encoder is checked
    with :func:`check_image_input`)."""
    where = f"{spec.model_path}"
    if spec.task == "promptable-segmentation":
        check_decoder(session, where)
        return
    check_image_input(spec, session, where)
    _check_outputs(spec, session.get_outputs(), where)


def check_image_input(spec: SubmodelSpec, session: Any, where: str) -> None:
    """The model takes one image input as the spec's ``input`` describes."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{where}: expected 1 input (tiles), model has {len(inputs)}: "
                         f"{[i.name for i in inputs]}")
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


def check_decoder(session: Any, where: str) -> None:
    """A SAM-style prompt decoder: SAM's ONNX export inputs and outputs, by name."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    missing = [n for n in DECODER_INPUTS if n not in inputs]
    extra = [n for n in inputs if n not in DECODER_INPUTS]
    if missing or extra:
        raise ModelError(f"{where}: a promptable-segmentation decoder takes inputs "
                         f"{list(DECODER_INPUTS)} (SAM's ONNX export); model takes {inputs}")
    if any(n not in outputs for n in DECODER_OUTPUTS[:2]):
        raise ModelError(f"{where}: a promptable-segmentation decoder outputs "
                         f"{list(DECODER_OUTPUTS)} (low_res_masks optional); model outputs "
                         f"{outputs}")


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
