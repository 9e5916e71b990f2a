"""Sub-model runtime throughput and overhead.

For each sub-model (the built-in nuclei-stain; a small CNN classifier exported on the
spot twice, taking float32 NCHW normalised by the runtime and taking uint8 tiles with the
normalisation in the graph; and any spec YAML given as arguments): tiles/s through the runtime (prepare ->
session.run -> decode to level 0 -> de-duplicate) against a bare ``session.run`` loop over
the same batches, prepared beforehand (uint8, or normalised float32 for float models),
on the model file as exported, in the same process. The runtime fuses a float model's
normalisation into its graph, so it too takes the stream's uint8 tiles.
Overhead target: <= 10%.

    python bench/submodels.py [SPEC.yaml ...] [--tiles 512] [--batch 64] [--px 224]

Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_assist.models import submodels as sm
from wsi_assist.models.submodel_decode import Accumulator, TileFrame
from wsi_assist.settings import BUILTIN_SUBMODEL
from wsi_assist.synthetic import default_slide


def make_batches(n: int, batch: int, px: int) -> list[np.ndarray]:
    spec = default_slide(4096, 3072)
    rng = np.random.default_rng(0)
    tiles = [spec.render(float(x), float(y), px, px) for x, y in
             zip(rng.uniform(800, 1600, n), rng.uniform(800, 2000, n), strict=True)]
    arr = np.stack(tiles)
    return [arr[i:i + batch] for i in range(0, n, batch)]


def classifier_spec(out: Path, px: int) -> list[Path]:
    import torch
    from torch import nn

    from exporters.submodels import Uint8Input, export_model, spec_dict

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 7, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, 2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    paths = []
    for uint8 in (False, True):  # normalised by the runtime, or inside the graph
        name = "cnn-uint8" if uint8 else "cnn-float"
        spec = spec_dict(name, "tile-classification", list("abcd"), px, 0.5, mean, std,
                         uint8=uint8)
        export_model((Uint8Input(net, mean, std) if uint8 else net).eval(), out, spec,
                     atol=1e-3)
        paths.append(out / f"{name}.yaml")
    return paths


def bench_one(sub: sm.Submodel, plain: sm.Submodel, batches: list[np.ndarray], rounds: int
              ) -> dict[str, float]:
    """``sub`` as the runtime uses it (preprocessing fused into float models) against a bare
    loop over the model file as exported, fed batches prepared beforehand."""
    px = batches[0].shape[1]
    size = sub.model_px(px, 0.5)
    prepared = [plain.prepare(b, size) for b in batches]
    n = sum(len(b) for b in batches)

    def bare() -> None:
        for x in prepared:
            plain.session.run(None, {plain.input_name: x})

    def runtime(sub: sm.Submodel = sub) -> None:
        acc = Accumulator(sub.spec, n, 0.25)
        start = 0
        for b in batches:
            rows = np.arange(start, start + len(b))
            corners = np.stack([rows * px * 2.0, np.zeros(len(b))], axis=1)
            acc.add(rows, sub.run(sub.prepare(b, size)), TileFrame(corners, 2.0, size))
            start += len(b)
        acc.finish(1.0)

    bare(), runtime()  # warm-up
    t_bare, t_rt = [], []
    for _ in range(rounds):  # interleaved, best of each
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runtime()
        t_rt.append(time.perf_counter() - t0)
    b, r = min(t_bare), min(t_rt)
    res = {"tiles_per_s_bare": n / b, "tiles_per_s_runtime": n / r,
           "overhead": r / b - 1.0, "providers": sub.session.get_providers()[0],
           "fused_preprocessing": sub.fused}
    if sub.fused:  # the same runtime with numpy preprocessing instead, for comparison
        t_np = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            runtime(plain)
            t_np.append(time.perf_counter() - t0)
        res["tiles_per_s_runtime_numpy_preprocessing"] = n / min(t_np)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", type=Path)
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to use GPU providers")
    args = ap.parse_args()
    batches = make_batches(args.tiles, args.batch, args.px)
    providers = sm.choose_providers(None, args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = [sm.builtin_dir() / BUILTIN_SUBMODEL, *classifier_spec(Path(tmp), args.px),
                 *args.specs]
        for path in specs:
            sub = sm.get_submodel(path, providers)
            plain = sm.Submodel.load(path, providers, fuse=False)
            res = bench_one(sub, plain, batches, args.rounds)
            results[sub.spec.name] = res
            print(f"{sub.spec.name:>16} [{res['providers']}]: runtime "
                  f"{res['tiles_per_s_runtime']:8.1f} tiles/s, bare session.run "
                  f"{res['tiles_per_s_bare']:8.1f} tiles/s, overhead "
                  f"{100 * res['overhead']:+.1f}% (target <= 10%)"
                  + (f"; numpy preprocessing instead of fused: "
                     f"{res['tiles_per_s_runtime_numpy_preprocessing']:.1f} tiles/s"
                     if res["fused_preprocessing"] else ""))
    print(json.dumps({"tiles": args.tiles, "batch": args.batch, "px": args.px,
                      "device": args.device, "submodels": results}))


if __name__ == "__main__":
    main()
