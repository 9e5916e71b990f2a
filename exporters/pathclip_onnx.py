"""Export an open_clip image encoder (PathCLIP by default) to ONNX and check parity.

    python -m exporters.pathclip_onnx pathclip --pathclip pathclip-base.pt -o pathclip.onnx

The graph takes ``pixel_values`` (N, 3, S, S) float32, normalised with the model's mean
and std (dynamic N), and returns L2-normalised ``embeddings`` (N, D). Metadata records the
source weights' SHA-256, input size, mean and std, which ``--engine onnx`` checks and
uses. After export, onnxruntime and PyTorch are compared on random tiles: the maximum
absolute difference is printed and must be within ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import ModelError, WsiAssistError
from wsi_assist.models.embed import ONNX_META, OnnxEncoder
from wsi_assist.models.pathclip import LoadedModel, encode_images, load_model


def _wrapper(lm: LoadedModel) -> Any:
    import torch
    import torch.nn.functional as F

    class ImageEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = lm.model.visual

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.visual(pixel_values), dim=-1)

    return ImageEncoder().eval().cpu()


def export(lm: LoadedModel, out: Path, opset: int = 17) -> Path:
    """Write the image encoder of ``lm`` to ``out`` (dynamic batch) with its metadata."""
    import onnx
    import torch

    if lm.device != "cpu":
        raise ModelError("export from a model loaded on the CPU")
    s = lm.image_size
    example = torch.zeros(2, 3, s, s)
    out.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA op has no ONNX symbolic
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's shape checks become constants; the batch axis stays dynamic
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(_wrapper(lm), (example,), str(out),
                              input_names=["pixel_values"], output_names=["embeddings"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "batch"},
                                            "embeddings": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(out))
    meta = {"source_sha256": lm.sha256, "model": lm.spec.spec, "arch": lm.spec.arch,
            "image_size": str(s), "embed_dim": str(lm.embed_dim),
            "mean": ",".join(map(repr, lm.mean)), "std": ",".join(map(repr, lm.std))}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_META + k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def parity(lm: LoadedModel, onnx_path: Path, n: int = 4, seed: int = 0) -> float:
    """Max |ONNX - PyTorch| over ``n`` random uint8 tiles of the model's input size
    (normalised embeddings)."""
    import torch

    rng = np.random.default_rng(seed)
    size = lm.image_size
    tiles = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ref = encode_images(lm, torch.from_numpy(tiles), "fp32").numpy()
    enc = OnnxEncoder(onnx_path, "cpu", expect_sha256=lm.sha256)
    got = np.asarray(enc.submit(tiles), np.float32)
    return float(np.abs(got - ref).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporters.pathclip_onnx",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model spec: pathclip, ARCH:/path/ckpt.pt, hf-hub:...")
    ap.add_argument("-o", "--out", type=Path, required=True, help="ONNX file to write")
    ap.add_argument("--pathclip", help="pathclip-base.pt for the 'pathclip' spec")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="max abs difference allowed between ONNX and PyTorch embeddings")
    args = ap.parse_args(argv)
    try:
        lm = load_model(args.model, "cpu", pathclip=args.pathclip)
        export(lm, args.out)
        diff = parity(lm, args.out)
    except WsiAssistError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    ok = diff <= args.tolerance
    sys.stdout.write(json.dumps({"onnx": str(args.out), "max_abs_diff": diff,
                                 "tolerance": args.tolerance, "ok": ok}) + "\n")
    if not ok:
        sys.stderr.write(f"error: parity check failed: max abs difference {diff:.3g} > "
                         f"{args.tolerance:g}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
