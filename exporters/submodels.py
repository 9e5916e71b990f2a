"""Export PyTorch models as wsi-assist sub-models: ``<name>.onnx`` plus ``<name>.yaml``.

    python -m exporters.submodels timm --arch convnext_tiny --classes a,b,c \
        --checkpoint lbc.pt --name lbc-cytology -o models/
    python -m exporters.submodels factory --factory mypkg.nets:build --task point-detection \
        --classes positive,negative --checkpoint p2p.pt --name ki67 -o models/

    python -m exporters.submodels factory --factory mypkg.yolo:build \
        --spec configs/submodels/pathasst-lbc-yolov7.yaml --checkpoint yolo.pt -o models/

A detector ending in its raw head (YOLOv5/v7 ``(B, N, 5+nc)``, YOLOv8+ ``(B, 4+nc, N)``,
P2PNet's ``{'pred_logits', 'pred_points'}``) is found from what it returns, or named by
``--head``; its spec gets the matching ``decode`` step. Outputs that fit nothing are
refused in one line naming what was found and what the task expects.

Every export has a dynamic batch axis, passes ``onnx.checker`` and is compared with the
PyTorch model on random input: the largest difference is printed and an export beyond
the tolerance is refused. Checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from wsi_assist.errors import ModelError, first_line
from wsi_assist.models.submodel_spec import (
    DETECTION_OUTPUTS,
    HEAD_OUTPUTS,
    HEAD_TASKS,
    TASKS,
    affine,
    head_axes,
)

log = logging.getLogger(__name__)

PALETTE = ((220, 50, 50), (50, 110, 220), (40, 170, 80), (230, 160, 30), (150, 70, 200),
           (30, 180, 190), (200, 80, 150), (120, 120, 120))


class TimmClassifier(nn.Module):
    """PathAsst's layout: a timm backbone with ``num_classes=0`` and ``Linear(D, N)``."""

    def __init__(self, arch: str, n_classes: int) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        self.head = nn.Linear(self.backbone.num_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Uint8Input(nn.Module):
    """Bakes preprocessing into the graph: uint8 NHWC RGB tiles -> ``model`` on
    ``(x / scale - mean) / std`` NCHW, so the runtime hands tiles over without a copy."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 scale: float = 255.0) -> None:
        super().__init__()
        self.model = model
        gain, bias = affine(mean, std, scale)
        self.register_buffer("gain", torch.from_numpy(gain).view(1, 3, 1, 1))
        self.register_buffer("bias", torch.from_numpy(bias).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x.permute(0, 3, 1, 2).to(torch.float32) * self.gain + self.bias)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a checkpoint (bare, or under ``state_dict``/``model``), with
    ``module.`` prefixes (DataParallel) removed. Training scripts often store their
    ``argparse.Namespace`` beside the weights (PathAsst's classifier does): that one
    plain-attribute class is allowed to the weights-only unpickler, nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise ModelError(f"{path}: cannot read checkpoint "
                         f"({str(e).strip().splitlines()[0][:300]})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def backbone_prefix(sd: dict[str, torch.Tensor], own: Sequence[str]) -> str:
    """The key prefix under which ``sd`` holds every backbone weight ``own`` names:
    ``backbone.`` (ours), ``model_global.`` (PathAsst's ``CT_SINGLE``), ``""`` (bare)..."""
    first = own[0]
    found = sorted({k[: -len(first)] for k in sd if k.endswith(first)}, key=len)
    for prefix in found:
        if (prefix.endswith(".") or not prefix) and all(prefix + k in sd for k in own):
            return prefix
    return found[0] if found else "backbone."


def load_timm_checkpoint(model: TimmClassifier, path: Path) -> None:
    """Fill backbone and head. The backbone may sit under any prefix (``backbone.``,
    PathAsst's ``model_global.``, none); the head may be stored as ``head``, ``fc`` or
    ``classifier`` (or any one remaining Linear's weight/bias pair)."""
    sd = read_state_dict(path)
    own = model.backbone.state_dict()
    prefix = backbone_prefix(sd, list(own))
    bb = {k.removeprefix(prefix): v for k, v in sd.items()}
    missing = [k for k in own if k not in bb]
    if missing:
        raise ModelError(f"{path}: backbone weights missing, e.g. {missing[0]!r} "
                         f"({len(missing)} of {len(own)})")
    model.backbone.load_state_dict({k: bb[k] for k in own})
    rest = {k: v for k, v in bb.items() if k not in own}
    w = [k for k, v in rest.items() if k.endswith("weight") and v.ndim == 2]
    if len(w) != 1:
        raise ModelError(f"{path}: expected one Linear head beside the backbone, found "
                         f"{len(w)} candidates {w[:4]}")
    head = {"weight": rest[w[0]], "bias": rest.get(w[0][: -len("weight")] + "bias")}
    if head["bias"] is None or tuple(head["weight"].shape) != tuple(model.head.weight.shape):
        raise ModelError(f"{path}: head {w[0]!r} has shape {tuple(head['weight'].shape)}, "
                         f"expected {tuple(model.head.weight.shape)} with a bias")
    model.head.load_state_dict(head)


def describe_outputs(out: Any) -> str:
    """What a network returned, in words: ``tensor (2, 100, 7)``, ``dict {...}``, ..."""
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)}"
    if isinstance(out, dict):
        return "dict {" + ", ".join(f"{k!r}: {describe_outputs(v)}" for k, v in out.items()) + "}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(describe_outputs(v) for v in out[:6])
        return f"{type(out).__name__} ({inner}{', ...' if len(out) > 6 else ''})"
    return type(out).__name__


def expected_outputs(task: str, n: int, n_extra: int = 0) -> str:
    """What a network for ``task`` with ``n`` classes must return, in words."""
    if task == "tile-classification":
        return f"one tensor (B, {n})"
    if task == "segmentation":
        return f"one tensor (B, {n}, H, W)"
    names = ", ".join([*DETECTION_OUTPUTS[task], *(["measurements"] if n_extra else [])])
    if task == "point-detection":
        return (f"a tuple ({names}) or a P2PNet head {{'pred_logits': (B, N, {n + 1}), "
                f"'pred_points': (B, N, 2)}}")
    return (f"a tuple ({names}) or a YOLOv5/v7 head (B, N, {5 + n}) or a YOLOv8 head "
            f"(B, {4 + n}, N)")


def _first_tensor(out: Any) -> torch.Tensor | None:
    """``out`` itself, or the first item of a tuple/list (YOLOv5/v7 and v8 in eval mode
    return ``(predictions, feature maps)``)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def head_fits(out: Any, head: str, n: int) -> bool:
    """Whether ``out`` is the raw output of a ``head`` with ``n`` classes."""
    if head == "p2pnet":
        if not isinstance(out, dict):
            return False
        ts = [out.get("pred_logits"), out.get("pred_points")]
    else:
        ts = [_first_tensor(out)]
    if not all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in ts):
        return False
    if head == "p2pnet" and ts[0].shape[1] != ts[1].shape[1]:  # one point per logit row
        return False
    return all(t.shape[axis] == size
               for t, (axis, size) in zip(ts, head_axes(head, n), strict=True))


def standard_fits(out: Any, task: str, n: int, names: Sequence[str]) -> bool:
    """Whether ``out`` already is the task's standard output (named ``names``)."""
    if task in DETECTION_OUTPUTS:
        if isinstance(out, dict):
            out = [out.get(k) for k in names]
        return (isinstance(out, (tuple, list)) and len(out) == len(names)
                and all(isinstance(t, torch.Tensor) for t in out)
                and out[0].ndim == 3 and all(t.shape[:2] == out[0].shape[:2] for t in out))
    ndim = 2 if task == "tile-classification" else 4
    return isinstance(out, torch.Tensor) and out.ndim == ndim and out.shape[1] == n


def find_head(out: Any, task: str, n: int, names: Sequence[str], head: str | None
              ) -> str | None:
    """The raw head ``out`` comes from (``None``: the task's standard outputs); the one
    told (``head``) is checked. ModelError, naming what was found and what fits, else."""
    found = describe_outputs(out)
    if head is not None:
        if HEAD_TASKS[head] != task:
            raise ModelError(f"--head {head} gives {HEAD_TASKS[head]}, not {task}")
        if not head_fits(out, head, n):
            raise ModelError(f"model outputs {found} do not fit --head {head} with {n} "
                             f"classes: {task} expects {expected_outputs(task, n)}")
        return head
    if standard_fits(out, task, n, names):
        return None
    fit = [h for h, t in HEAD_TASKS.items() if t == task and head_fits(out, h, n)]
    if fit == ["yolov5", "yolov7"]:  # one layout; they score only a one-class model apart
        if n == 1:
            raise ModelError(f"model outputs {found} fit both yolov5 and yolov7 heads, "
                             f"which score one class differently (objectness x class "
                             f"score, or objectness alone); say which with --head")
        fit = ["yolov5"]
    if len(fit) == 1:
        return fit[0]
    if len(fit) > 1:
        raise ModelError(f"model outputs {found} fit both {' and '.join(fit)} heads; "
                         f"say which with --head")
    raise ModelError(f"model outputs {found} do not fit {task} with {n} classes: expected "
                     f"{expected_outputs(task, n, len(names) - 3)}")


class SelectOutputs(nn.Module):
    """Returns exactly the tensors the spec names: a raw head's (``head``), or the task's
    standard outputs from a tuple or a dict keyed by their names."""

    def __init__(self, model: nn.Module, head: str | None, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.head, self.names = model, head, tuple(names)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        if self.head == "p2pnet":
            return out["pred_logits"], out["pred_points"]
        if self.head is not None:
            return _first_tensor(out)
        if isinstance(out, dict):
            return tuple(out[k] for k in self.names)
        return tuple(out) if isinstance(out, (tuple, list)) else out


def load_factory_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state_dict into the factory's network; ModelError (one line) naming the
    first missing, unexpected or mis-shaped key."""
    sd = read_state_dict(path)
    own = model.state_dict()
    bad = [f"{k!r} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the "
           f"network" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad or missing or unexpected:
        what = (bad[0] if bad else f"missing {missing[0]!r} ({len(missing)} missing)"
                if missing else f"unexpected {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise ModelError(f"{path}: checkpoint does not fit the network: {what}")
    model.load_state_dict(sd)


def load_factory(target: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call ``module:function`` (a factory the user names) to build the network."""
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"factory must be 'module:function', got {target!r}")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    model = fn(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path,
                output_names: Sequence[str], dynamic_hw: bool = False,
                output_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Trace to ONNX (opset 17, dynamic batch, optionally dynamic height/width), check it.
    ``output_axes``: dynamic axes of outputs other than the batch (default: batch only)."""
    import onnx

    output_axes = output_axes or {}
    model.eval()
    spatial = (1, 2) if example.dtype == torch.uint8 else (2, 3)
    axes = {0: "batch", **({spatial[0]: "height", spatial[1]: "width"} if dynamic_hw else {})}
    dyn = {"tiles": axes, **{n: dict(output_axes.get(n, {0: "batch"}))
                             for n in output_names}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["tiles"],
                          output_names=list(output_names), dynamic_axes=dyn,
                          opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def parity(model: nn.Module, path: Path, example: torch.Tensor, atol: float = 1e-3,
           rtol: float = 1e-3) -> float:
    """Largest |torch - onnxruntime| over all outputs; ValueError beyond the tolerance."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = model(example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"tiles": example.numpy()})
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        r = r.numpy().astype(np.float64)
        g = np.asarray(g, np.float64)
        if r.shape != g.shape:
            raise ValueError(f"{path}: output shape {g.shape} != PyTorch {r.shape}")
        diff = np.abs(r - g)
        worst = max(worst, float(diff.max(initial=0.0)))
        if np.any(diff > atol + rtol * np.abs(r)):
            raise ValueError(f"{path}: ONNX differs from PyTorch by up to {worst:.3g} "
                             f"(atol {atol}, rtol {rtol})")
    return worst


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    """The YAML sidecar, validated by loading it back against the model."""
    from wsi_assist.models.submodel_spec import check_against_model, load_spec
    from wsi_assist.models.submodels import create_session

    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    loaded = load_spec(path)
    check_against_model(loaded, create_session(loaded.model_path, ["CPUExecutionProvider"]))


def spec_dict(name: str, task: str, classes: list[str], tile_px: int | None, mpp: float,
              mean: Sequence[float], std: Sequence[float], uint8: bool = False,
              **extra: Any) -> dict[str, Any]:
    """A spec for an exported network; ``uint8``: preprocessing is baked in (Uint8Input)."""
    colors = [list(PALETTE[i % len(PALETTE)]) for i in range(len(classes))]
    out: dict[str, Any] = {"classes": classes, "colors": colors}
    out.update(extra.pop("output", {}))
    norm = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    inp: dict[str, Any] = {"tile_px": tile_px, "mpp": mpp, "channel_order": "RGB"}
    if uint8:
        inp.update({"layout": "NHWC", "dtype": "uint8"})
        extra.setdefault("model_params", {})["baked_normalisation"] = {**norm, "scale": 255.0}
    else:
        inp.update({"layout": "NCHW", "dtype": "float32", "scale": 255.0, **norm})
    return {"name": name, "task": task, "model": f"{name}.onnx", "input": inp,
            "output": out, **extra}


def _select_head(model: nn.Module, example: torch.Tensor, spec: dict[str, Any],
                 names: list[str], head: str | None
                 ) -> tuple[nn.Module, list[str], dict[str, dict[int, str]]]:
    """Run ``model`` once, find (or check) its head layout; the model wrapped to return
    exactly the tensors to export, their names and dynamic axes. A raw head gets the
    spec's ``decode`` step."""
    declared = (spec.get("decode") or {}).get("head")
    if head is not None and declared is not None and head != declared:
        raise ModelError(f"--head {head}, but the spec declares decode head {declared}")
    with torch.no_grad():
        out = model.eval()(example)
    found = find_head(out, spec["task"], len(spec["output"]["classes"]), names,
                      head or declared)
    if found is None:
        return SelectOutputs(model, None, names), names, {}
    spec["decode"] = {**(spec.get("decode") or {}), "head": found}
    names = list(spec["decode"].get("outputs") or HEAD_OUTPUTS[found])
    anchors = 2 if found == "yolov8" else 1
    axes = {n: {0: "batch", (1 if n == "pred_points" else anchors): "anchors"} for n in names}
    return SelectOutputs(model, found, names), names, axes


def export_model(model: nn.Module, out_dir: Path, spec: dict[str, Any], atol: float,
                 batch: int = 2, seed: int = 0, head: str | None = None) -> float:
    """Export ``model`` with spec ``spec`` into ``out_dir``; returns the parity difference.
    ``head``: the raw detection head it ends in (``yolov5``, ``yolov7``, ``yolov8``,
    ``p2pnet``);
    found from its outputs when not given (or declared in ``spec['decode']``)."""
    inp = spec["input"]
    g = torch.Generator().manual_seed(seed)
    px = inp["tile_px"] or 224
    if inp["dtype"] == "uint8":
        example = torch.randint(0, 256, (batch, px, px, 3), generator=g, dtype=torch.uint8)
    else:
        example = torch.randn((batch, 3, px, px), generator=g)
    names = [*DETECTION_OUTPUTS.get(spec["task"], ["output"]),
             *spec.pop("extra_outputs", [])]
    model, names, axes = _select_head(model, example, spec, names, head)
    onnx_path = out_dir / spec["model"]
    export_onnx(model, example, onnx_path, names, dynamic_hw=inp["tile_px"] is None,
                output_axes=axes)
    diff = parity(model, onnx_path, example, atol=atol, rtol=atol)
    write_spec(out_dir / f"{spec['name']}.yaml", spec)
    return diff


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporters.submodels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    for name, hlp in (("timm", "a timm classifier (+ Linear head)"),
                      ("factory", "any network from a module:function factory")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--spec", type=Path,
                       help="start from this spec (e.g. configs/submodels/pathasst-*.yaml): "
                            "its name, task, classes, colours, scores, decode step and "
                            "input size/mpp/mean/std, unless given here")
        s.add_argument("--name")
        s.add_argument("--classes", help="comma-separated class names")
        s.add_argument("--checkpoint", type=Path, help="state_dict (weights_only load)")
        s.add_argument("-o", "--out", type=Path, required=True)
        s.add_argument("--tile-px", type=int, help="input size (default 224)")
        s.add_argument("--mpp", type=float, help="um/px of the input (default 0.5)")
        s.add_argument("--mean", help="default ImageNet's 0.485,0.456,0.406")
        s.add_argument("--std", help="default ImageNet's 0.229,0.224,0.225")
        s.add_argument("--atol", type=float, default=1e-3)
        s.add_argument("--float-input", action="store_true",
                       help="take normalised float32 NCHW input (default: uint8 NHWC tiles "
                            "with mean/std baked into the graph)")
    sub.choices["timm"].add_argument("--arch", default="convnext_tiny")
    f = sub.choices["factory"]
    f.add_argument("--factory", required=True, help="module:function returning nn.Module")
    f.add_argument("--measurements", default="",
                   help="point/box detection: names of a 4th output 'measurements' (B,P,K)")
    f.add_argument("--task", choices=list(TASKS),
                   help="the task (implied by --head or --spec when not given)")
    f.add_argument("--head", choices=list(HEAD_OUTPUTS),
                   help="the raw detection head the network ends in: yolov5 or yolov7 "
                        "((B,N,5+nc); a one-class yolov7 is scored by objectness alone), "
                        "yolov8 ((B,4+nc,N)) or p2pnet (dict pred_logits, pred_points); "
                        "found from its outputs when not given")
    return p


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def build_spec(args: argparse.Namespace, task: str, template: dict[str, Any]
               ) -> dict[str, Any]:
    """The spec of this export: options given, else the template's values, else defaults."""
    t_in, t_out = dict(template.get("input") or {}), dict(template.get("output") or {})
    name = args.name or template.get("name")
    classes = ([c.strip() for c in args.classes.split(",") if c.strip()] if args.classes
               else [str(c) for c in t_out.get("classes", ())])
    if not name or not classes:
        raise ValueError("--name and --classes are required (or a --spec giving them)")
    if args.classes:  # colours and per-class settings of the template no longer apply
        t_out.pop("colors", None)
    t_out.pop("classes", None)
    tile_px = args.tile_px if args.tile_px is not None else t_in.get("tile_px", 224)
    mpp = args.mpp if args.mpp is not None else t_in.get("mpp", 0.5)
    mean = _floats(args.mean) if args.mean else t_in.get("mean") or list(IMAGENET_MEAN)
    std = _floats(args.std) if args.std else t_in.get("std") or list(IMAGENET_STD)
    extra = {k: template[k] for k in ("description", "tiles", "scores", "decode")
             if template.get(k) is not None}
    spec = spec_dict(name, task, classes, tile_px, mpp, mean, std,
                     uint8=not args.float_input, output=t_out, **extra)
    if t_in.get("background"):
        spec["input"]["background"] = t_in["background"]
    return spec


def _task(args: argparse.Namespace, template: dict[str, Any]) -> str:
    if args.kind == "timm":
        task = "tile-classification"
    else:
        head = args.head or (template.get("decode") or {}).get("head")
        task = args.task or template.get("task") or HEAD_TASKS.get(head or "", "")
    if not task:
        raise ValueError("--task is required (or --head, or a --spec naming the task)")
    if template.get("task", task) != task:
        raise ValueError(f"{args.spec}: the spec's task is {template['task']}, not {task}")
    return str(task)


def main(argv: Sequence[str] | None = None) -> int:
    from wsi_assist.files import read_yaml

    args = _parser().parse_args(argv)
    try:
        template = read_yaml(args.spec, "sub-model spec", ModelError) if args.spec else {}
        if not isinstance(template, dict):
            raise ModelError(f"{args.spec}: a sub-model spec must be a mapping")
        if isinstance(template.get("decode"), str):  # the short form: just the head
            template["decode"] = {"head": template["decode"]}
        task = _task(args, template)
        spec = build_spec(args, task, template)
        classes = spec["output"]["classes"]
        if args.kind == "timm":
            timm_net = TimmClassifier(args.arch, len(classes))
            if args.checkpoint:
                load_timm_checkpoint(timm_net, args.checkpoint)
            model: nn.Module = timm_net
        else:
            model = load_factory(args.factory)
            if args.checkpoint:
                load_factory_checkpoint(model, args.checkpoint)
        if not args.float_input:
            norm = spec["model_params"]["baked_normalisation"]
            model = Uint8Input(model, norm["mean"], norm["std"])
        meas = [m.strip() for m in getattr(args, "measurements", "").split(",") if m.strip()]
        if meas:
            spec["output"]["measurement_names"] = meas
            spec["extra_outputs"] = ["measurements"]
        diff = export_model(model.eval(), args.out, spec, atol=args.atol,
                            head=getattr(args, "head", None))
    except (ModelError, ValueError, TypeError, ImportError, AttributeError, KeyError,
            RuntimeError) as e:
        print(f"error: {first_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    decode = f" (decode step: {spec['decode']['head']})" if spec.get("decode") else ""
    print(f"{args.out / spec['model']}: max |torch - onnx| = {diff:.3g} (atol {args.atol})"
          f"{decode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
