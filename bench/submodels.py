"""Sub-model runtime throughput and overhead.

The built-in nucleus analysis (``nuclei``): tiles/s of the stage's path (the tile stream
read in haloed blocks, nuclei kept by the tile holding their centroid, outlines and
measurements moved to level 0) over every tile of a real slide, against a plain loop
calling ``detect_nuclei`` on each 224 px tile alone (read beforehand; no halo, so
nuclei at tile borders come in halves), in the same run; and the stage's path tile by
tile (each tile with its own halo), for comparison.

For each ONNX sub-model (a small CNN classifier exported on the spot twice, taking
float32 NCHW normalised by the runtime and taking uint8 tiles with the normalisation in
the graph; and any spec YAML given as arguments): tiles/s through the runtime (prepare
-> session.run -> decode to level 0 -> de-duplicate) against a bare ``session.run`` loop over
the same batches, prepared beforehand (uint8, or normalised float32 for float models),
on the model file as exported, in the same process. The runtime fuses a float model's
normalisation into its graph, so it too takes the stream's uint8 tiles.
Raw detection heads with the runtime's declared decode step (``yolov5``: (B, N, 5+nc)
with class-aware NMS per tile; ``yolov8``: (B, 4+nc, N), same; ``p2pnet``: softmax over
(B, N, K+1), points): the same CNN trunk at stride 8 ending in each head, exported on
the spot; for YOLO twice, "sparse" (an objectness prior of a trained detector on
tissue: a few % of anchors reach the threshold) and "dense" (every anchor does: the
worst case for decoding and NMS). The runtime's numbers include decoding, NMS and the
slide-level de-duplication.
Overhead target: <= 10%.

    python bench/submodels.py [SPEC.yaml ...] [--tiles 512] [--batch 64] [--px 224]
                              [--nuclei-slide SLIDE] [--released-size]

``--released-size``: PathAsst's example specs (the pathology selector, the LBC detector
with YOLOv7's and YOLOv8's heads, HER2 P2PNet) on random-weight stand-ins with the
released models' input sizes, strides, anchor counts and backbone class
(``bench/released_nets.py``), so that ``session.run`` costs what it costs in use.
Overhead: the median over rounds of the runtime's time / the bare loop's, paired round
by round (both interleaved), and the same difference in ms a tile.

Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_assist.models import submodels as sm
from wsi_assist.models.submodel_decode import Accumulator, TileFrame
from wsi_assist.synthetic import default_slide

SHARED = Path(__file__).resolve().parents[2] / "shared" / "slides"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "submodels"


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


def _trunk() -> Any:  # a torch module (torch is imported lazily)
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())


def head_nets(nc: int = 6, prior: float = -3.0, spread: float = 10.0) -> dict[str, Any]:
    """Stride-8 CNNs ending in a raw YOLOv5/v7, YOLOv8 or P2PNet head (layouts as
    exported by those projects); ``prior``: objectness / class logit bias; ``spread``:
    gain on the head's random weights, so that logits vary between anchors as a trained
    head's do."""
    import torch
    from torch import nn

    class V5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.m = _trunk(), nn.Conv2d(32, 3 * (5 + nc), 1)
            with torch.no_grad():  # logits that vary from anchor to anchor
                self.m.weight.mul_(spread)
                self.m.bias.view(3, 5 + nc)[:, 4] = prior

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.m(self.trunk(x))
            b, _, h, w = f.shape
            p = f.view(b, 3, 5 + nc, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack([xs, ys], -1).view(1, 1, h, w, 2).float()
            xy = (p[..., :2] * 2 - 0.5 + grid) * 8
            wh = (p[..., 2:4] * 2) ** 2 * 12
            return torch.cat([xy, wh, p[..., 4:]], -1).reshape(b, -1, 5 + nc)

    class V8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.box, self.cls = _trunk(), nn.Conv2d(32, 4, 1), nn.Conv2d(32, nc, 1)
            with torch.no_grad():
                self.cls.weight.mul_(spread)
                self.cls.bias.fill_(prior)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.trunk(x)
            b, _, h, w = f.shape
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            centre = (torch.stack([xs, ys]).view(1, 2, -1).float() + 0.5) * 8
            wh = torch.nn.functional.softplus(self.box(f)).flatten(2)[:, :2] * 8
            return torch.cat([centre.expand(b, -1, -1), wh,
                              self.cls(f).flatten(2).sigmoid()], 1)

    class P2P(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = _trunk()
            self.reg, self.cls = nn.Conv2d(32, 8, 3, padding=1), nn.Conv2d(32, 4 * 3, 3,
                                                                           padding=1)
            with torch.no_grad():  # mostly background, as on tissue: a few % are cells
                self.cls.weight.mul_(spread)
                self.cls.bias.view(4, 3)[:, 2] = -prior

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = self.trunk(x)
            b, _, h, w = f.shape
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            a = torch.stack([xs, ys], -1).view(1, -1, 1, 2).float() * 8 + torch.tensor(
                [[2.0, 2], [6, 2], [2, 6], [6, 6]])
            pts = a.reshape(1, -1, 2) + self.reg(f).permute(0, 2, 3, 1).reshape(b, -1, 2)
            return {"pred_logits": self.cls(f).permute(0, 2, 3, 1).reshape(b, -1, 3),
                    "pred_points": pts}

    torch.manual_seed(0)
    return {"yolov5": V5(), "yolov8": V8(), "p2pnet": P2P()}


def head_specs(out: Path, px: int) -> list[Path]:
    """The head nets exported with their decode steps ("sparse" and "dense" YOLO)."""
    from exporters.submodels import Uint8Input, export_model, spec_dict

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    paths = []
    for prior, tag in ((-3.0, "sparse"), (3.0, "dense")):
        for head, net in head_nets(prior=prior).items():
            if head == "p2pnet" and tag == "dense":
                continue  # no objectness: softmax over every point either way
            name = f"{head}-{tag}" if head != "p2pnet" else head
            task = "point-detection" if head == "p2pnet" else "box-detection"
            classes = ["pos", "neg"] if head == "p2pnet" else [f"c{i}" for i in range(6)]
            spec = spec_dict(name, task, classes, px, 0.5, mean, std, uint8=True,
                             output={"score_threshold": 0.25 if head != "p2pnet" else 0.5})
            export_model(Uint8Input(net, mean, std).eval(), out, spec, atol=1e-3,
                         head=head)
            paths.append(out / f"{name}.yaml")
    return paths


def released_specs(out: Path) -> list[tuple[Path, int]]:
    """PathAsst's example specs on stand-ins with their released compute
    (:mod:`released_nets`), exported through the exporter's CLI, each with the tile size
    it is fed: the pathology selector (timm ConvNeXt-Tiny, 224 px), the LBC detector with
    YOLOv7's head and, on the same spec, YOLOv8's (640 px, sparse and dense), HER2
    P2PNet (224 px)."""
    import yaml

    from exporters import submodels as ex

    lbc = yaml.safe_load((CONFIGS / "pathasst-lbc-yolov7.yaml").read_text())
    v8 = out / "lbc-yolov8.yaml"
    v8.write_text(yaml.safe_dump({**lbc, "decode": {**lbc["decode"], "head": "yolov8"}}))
    runs = [("pathasst-pathology-selector", 224,
             ["timm", "--arch", "convnext_tiny", "--spec",
              CONFIGS / "pathasst-pathology-selector.yaml"]),
            ("pathasst-her2-p2pnet", 224,
             ["factory", "--factory", "released_nets:p2pnet_her2", "--spec",
              CONFIGS / "pathasst-her2-p2pnet.yaml"])]
    for head, template in (("yolov7", CONFIGS / "pathasst-lbc-yolov7.yaml"), ("yolov8", v8)):
        for tag in ("sparse", "dense"):
            runs.append((f"lbc-{head}-{tag}", 640,
                         ["factory", "--factory", f"released_nets:{head}_{tag}", "--spec",
                          template, "--name", f"lbc-{head}-{tag}"]))
    found = []
    for name, px, args in runs:
        if ex.main([*map(str, args), "-o", str(out)]) != 0:
            raise SystemExit(f"export of {name} failed")
        found.append((out / f"{name}.yaml", px))
    return found


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
    for _ in range(rounds):  # interleaved: tiles/s best of each, overhead paired
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runtime()
        t_rt.append(time.perf_counter() - t0)
    b, r = min(t_bare), min(t_rt)
    paired = np.asarray(t_rt) / np.asarray(t_bare)
    res = {"tiles_per_s_bare": n / b, "tiles_per_s_runtime": n / r,
           "overhead": float(np.median(paired)) - 1.0,
           "overhead_ms_per_tile": 1e3 * float(np.median(np.subtract(t_rt, t_bare))) / n,
           "providers": sub.session.get_providers()[0],
           "fused_preprocessing": sub.fused,
           "decode": sub.spec.decode.head if sub.spec.decode else None}
    if sub.spec.decode is not None:  # how many detections the decode step passed on
        acc = Accumulator(sub.spec, n, 0.25)
        for i, b in enumerate(batches):
            rows = np.arange(i * len(b), (i + 1) * len(b))
            acc.add(rows, sub.run(sub.prepare(b, size)), TileFrame(
                np.stack([rows * px * 2.0, np.zeros(len(b))], axis=1), 2.0, size))
        res["detections_per_tile"] = sum(len(v) for v in acc.parts.get("scores", [])) / n
        res.update(decode_cost(sub, sub.run(sub.prepare(batches[0], size)), prepared[0],
                               plain, reps=rounds))
    if sub.fused:  # the same runtime with numpy preprocessing instead, for comparison
        t_np = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            runtime(plain)
            t_np.append(time.perf_counter() - t0)
        res["tiles_per_s_runtime_numpy_preprocessing"] = n / min(t_np)
    return res


def decode_cost(sub: sm.Submodel, out: dict[str, np.ndarray], x: np.ndarray,
                plain: sm.Submodel, reps: int = 10) -> dict[str, float]:
    """ms for one batch: the decode step alone, and ``session.run`` (best of ``reps``)."""
    from wsi_assist.models.submodel_heads import decode_outputs

    def best(fn: Any) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    dec = sub.spec.decode
    return {"decode_ms_per_batch": best(lambda: decode_outputs(sub.spec, dec, out)),
            "session_run_ms_per_batch": best(
                lambda: plain.session.run(None, {plain.input_name: x}))}


def bench_nuclei(path: Path, rounds: int) -> dict[str, float]:
    """The built-in analysis over every tile of ``path``: the stage's path against a
    plain ``detect_nuclei`` loop over the same haloed blocks, read beforehand."""
    import shapely

    from wsi_assist import nuclei as nu
    from wsi_assist.settings import NucleiParams, TilingParams
    from wsi_assist.slide import describe
    from wsi_assist.stages import nuclei as builtin
    from wsi_assist.stain import default_vectors
    from wsi_assist.stream import stream
    from wsi_assist.tiling import grid as make_grid

    info = describe(path)
    w, h = info.level_dimensions[0]
    grid = make_grid(info, shapely.box(0, 0, w, h), TilingParams(min_tissue=0.0))
    stains, params = default_vectors("brightfield-he"), NucleiParams()
    size = info.level_dimensions[grid.level]
    one = NucleiParams(analysisTileMicrons=grid.stride_px * grid.level_downsample
                       * grid.mpp)
    layouts = {name: builtin.analysis_grid(grid, p) for name, p in
               (("blocks", params), ("tiles", one))}
    blocks, _ = layouts["blocks"]
    read = [t.copy() for b in stream(path, grid) for t in b.tiles]

    def runtime(name: str, p: NucleiParams) -> int:
        g, of = layouts[name]
        return len(builtin.analyse(stream(path, g, batch_size=builtin.BATCH), grid, g, of,
                                   stains, p, size))

    def plain() -> int:
        return sum(len(nu.detect_nuclei(t, grid.delivered_mpp, stains, params))
                   for t in read)

    times: dict[str, list[float]] = {"runtime": [], "tile_by_tile": [], "plain": []}
    found = {}
    for _ in range(rounds):  # interleaved, best of each
        for key, fn in (("runtime", lambda: runtime("blocks", params)),
                        ("tile_by_tile", lambda: runtime("tiles", one)), ("plain", plain)):
            t0 = time.perf_counter()
            found[key] = fn()
            times[key].append(time.perf_counter() - t0)
    n = len(grid)
    return {"slide": path.name, "tiles": n, "blocks": len(blocks),
            "nuclei": found["runtime"], "nuclei_tile_by_tile": found["tile_by_tile"],
            "nuclei_plain_loop": found["plain"],
            "tiles_per_s_runtime": n / min(times["runtime"]),
            "tiles_per_s_tile_by_tile": n / min(times["tile_by_tile"]),
            "tiles_per_s_plain_loop": n / min(times["plain"]),
            "overhead": min(times["runtime"]) / min(times["plain"]) - 1.0}


def run_nuclei(slide: Path, tmp: Path, rounds: int) -> dict[str, float]:
    """:func:`bench_nuclei` on ``slide`` (a synthetic one when absent), printed."""
    if not slide.is_file():
        from wsi_assist.synthetic import write_slide

        slide = write_slide(tmp / "synthetic.svs", default_slide(2048, 2048), mpp=0.5)
    nuc = bench_nuclei(slide, rounds)
    print(f"nuclei (built-in) on {nuc['slide']} ({nuc['tiles']} tiles, "
          f"{nuc['nuclei']} nuclei): runtime {nuc['tiles_per_s_runtime']:.1f} tiles/s "
          f"in {nuc['blocks']} haloed blocks, plain detect_nuclei loop over the tiles "
          f"(no halo) {nuc['tiles_per_s_plain_loop']:.1f} tiles/s, overhead "
          f"{100 * nuc['overhead']:+.1f}%; tile by tile (each with its halo) "
          f"{nuc['tiles_per_s_tile_by_tile']:.1f} tiles/s")
    return nuc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", type=Path)
    ap.add_argument("--tiles", type=int, help="tiles per model (512; 32 --released-size)")
    ap.add_argument("--batch", type=int, help="tiles a batch (64; 16 --released-size)")
    ap.add_argument("--released-size", action="store_true",
                    help="PathAsst's example specs on stand-ins with the released models' "
                         "compute (bench/released_nets.py) instead of tiny ones")
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to use GPU providers")
    ap.add_argument("--nuclei-slide", type=Path, default=SHARED / "CMU-1-Small-Region.svs",
                    help="slide for the built-in nucleus analysis (a synthetic one when "
                         "absent)")
    ap.add_argument("--skip-nuclei", action="store_true",
                    help="ONNX sub-models only (no built-in nucleus analysis)")
    args = ap.parse_args()
    args.tiles = args.tiles or (32 if args.released_size else 512)
    args.batch = args.batch or (16 if args.released_size else 64)
    batches: dict[int, list[np.ndarray]] = {}
    providers = sm.choose_providers(None, args.device)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_nuclei:
            results["nuclei (built-in)"] = run_nuclei(args.nuclei_slide, Path(tmp),
                                                      args.rounds)
        if args.released_size:
            specs = released_specs(Path(tmp))
        else:
            specs = [(p, args.px) for p in (*classifier_spec(Path(tmp), args.px),
                                            *head_specs(Path(tmp), args.px))]
        for path, px in [*specs, *((p, args.px) for p in args.specs)]:
            sub = sm.get_submodel(path, providers)
            plain = sm.Submodel.load(path, providers, fuse=False)
            if px not in batches:
                batches[px] = make_batches(args.tiles, args.batch, px)
            res = bench_one(sub, plain, batches[px], args.rounds)
            res["px"] = px
            results[sub.spec.name] = res
            print(f"{sub.spec.name:>16} [{res['providers']}]: runtime "
                  f"{res['tiles_per_s_runtime']:8.1f} tiles/s, bare session.run "
                  f"{res['tiles_per_s_bare']:8.1f} tiles/s, overhead "
                  f"{100 * res['overhead']:+.1f}% (target <= 10%), "
                  f"{res['overhead_ms_per_tile']:.2f} ms a tile"
                  + (f"; decode {res['decode']}, {res['detections_per_tile']:.1f} "
                     f"detections/tile, {res['decode_ms_per_batch']:.1f} ms a batch "
                     f"(session.run {res['session_run_ms_per_batch']:.1f} ms)"
                     if res["decode"] else "")
                  + (f"; numpy preprocessing instead of fused: "
                     f"{res['tiles_per_s_runtime_numpy_preprocessing']:.1f} tiles/s"
                     if res["fused_preprocessing"] else ""))
    print(json.dumps({"tiles": args.tiles, "batch": args.batch, "px": args.px,
                      "released_size": args.released_size,
                      "device": args.device, "submodels": results}))


if __name__ == "__main__":
    main()
