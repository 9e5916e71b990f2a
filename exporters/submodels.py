"""Export PyTorch models as wsi-assist sub-models: ``<name>.onnx`` plus ``<name>.yaml``.

    python -m exporters.submodels timm --arch convnext_tiny --classes a,b,c \
        --checkpoint lbc.pt --name lbc-cytology -o models/
    python -m exporters.submodels factory --factory mypkg.nets:build --task point-detection \
        --classes positive,negative --checkpoint p2p.pt --name ki67 -o models/

Every export has a dynamic batch axis, passes ``onnx.checker`` and is compared with the
PyTorch model on random input: the largest difference is printed and an export beyond
the tolerance is refused. Checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from wsi_assist.errors import ModelError
from wsi_assist.models.submodel_spec import DETECTION_OUTPUTS, TASKS, affine

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
    ``module.`` prefixes (DataParallel) removed."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: cannot read checkpoint ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_timm_checkpoint(model: TimmClassifier, path: Path) -> None:
    """Fill backbone and head; the head may be stored as ``head``, ``fc`` or ``classifier``
    (or any one remaining Linear's weight/bias pair)."""
    sd = read_state_dict(path)
    bb = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.backbone.state_dict()
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
                output_names: Sequence[str], dynamic_hw: bool = False) -> None:
    """Trace to ONNX (opset 17, dynamic batch, optionally dynamic height/width), check it."""
    import onnx

    model.eval()
    spatial = (1, 2) if example.dtype == torch.uint8 else (2, 3)
    axes = {0: "batch", **({spatial[0]: "height", spatial[1]: "width"} if dynamic_hw else {})}
    dyn = {"tiles": axes, **{n: {0: "batch"} for n in output_names}}
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


def export_model(model: nn.Module, out_dir: Path, spec: dict[str, Any], atol: float,
                 batch: int = 2, seed: int = 0) -> float:
    """Export ``model`` with spec ``spec`` into ``out_dir``; returns the parity difference."""
    inp = spec["input"]
    g = torch.Generator().manual_seed(seed)
    px = inp["tile_px"] or 224
    if inp["dtype"] == "uint8":
        example = torch.randint(0, 256, (batch, px, px, 3), generator=g, dtype=torch.uint8)
    else:
        example = torch.randn((batch, 3, px, px), generator=g)
    names = [*DETECTION_OUTPUTS.get(spec["task"], ["output"]),
             *spec.pop("extra_outputs", [])]
    onnx_path = out_dir / spec["model"]
    export_onnx(model, example, onnx_path, names, dynamic_hw=inp["tile_px"] is None)
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
        s.add_argument("--name", required=True)
        s.add_argument("--classes", required=True, help="comma-separated class names")
        s.add_argument("--checkpoint", type=Path, help="state_dict (weights_only load)")
        s.add_argument("-o", "--out", type=Path, required=True)
        s.add_argument("--tile-px", type=int, default=224)
        s.add_argument("--mpp", type=float, default=0.5)
        s.add_argument("--mean", default="0.485,0.456,0.406")
        s.add_argument("--std", default="0.229,0.224,0.225")
        s.add_argument("--atol", type=float, default=1e-3)
        s.add_argument("--float-input", action="store_true",
                       help="take normalised float32 NCHW input (default: uint8 NHWC tiles "
                            "with mean/std baked into the graph)")
    sub.choices["timm"].add_argument("--arch", default="convnext_tiny")
    f = sub.choices["factory"]
    f.add_argument("--factory", required=True, help="module:function returning nn.Module")
    f.add_argument("--measurements", default="",
                   help="point/box detection: names of a 4th output 'measurements' (B,P,K)")
    f.add_argument("--task", required=True, choices=list(TASKS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if args.kind == "timm":
            model: nn.Module = TimmClassifier(args.arch, len(classes))
            if args.checkpoint:
                load_timm_checkpoint(model, args.checkpoint)
            task = "tile-classification"
        else:
            model, task = load_factory(args.factory), args.task
            if args.checkpoint:
                model.load_state_dict(read_state_dict(args.checkpoint))
        mean = [float(v) for v in args.mean.split(",")]
        std = [float(v) for v in args.std.split(",")]
        uint8 = not args.float_input
        if uint8:
            model = Uint8Input(model, mean, std)
        spec = spec_dict(args.name, task, classes, args.tile_px, args.mpp, mean, std,
                         uint8=uint8)
        meas = [m.strip() for m in getattr(args, "measurements", "").split(",") if m.strip()]
        if meas:
            spec["output"]["measurement_names"] = meas
            spec["extra_outputs"] = ["measurements"]
        diff = export_model(model.eval(), args.out, spec, atol=args.atol)
    except (ModelError, ValueError, TypeError, ImportError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out / spec['model']}: max |torch - onnx| = {diff:.3g} (atol {args.atol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
