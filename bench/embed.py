"""PathCLIP image-encoder throughput, model alone and fed by the tile stream.

    python bench/embed.py [--device cpu|cuda] [--slide PATH] [--batch-sizes 1,8]

The model is the PathCLIP architecture (open_clip ViT-B-16, QuickGELU) with random
weights. Part 1: images/s per precision and batch size on synthetic input already on the
device, as a ratio to the fp32 run at the smallest batch (the baseline, same process).
Part 2: stream + embed over a real slide's tile grid, tiles/s, its ratio to part 1 at the
same batch and precision, and the fraction of wall time spent waiting for input.
The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's wsi_assist

from wsi_assist.models.embed import TorchEncoder, embed_batches
from wsi_assist.models.pathclip import LoadedModel, ModelSpec, encode_images

DEFAULT_SLIDE = (Path(__file__).resolve().parents[1].parent / "shared" / "slides"
                 / "CMU-1-Small-Region.svs")


def random_pathclip(device: str) -> LoadedModel:
    import open_clip

    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True, load_weights=False)
    model = model.eval().to(device)
    spec = ModelSpec(spec="pathclip (random)", arch="ViT-B-16", quick_gelu=True)
    return LoadedModel(spec=spec, model=model, device=device, sha256="random", image_size=224,
                       mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                       embed_dim=512)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_s(lm: LoadedModel, batch: int, precision: str, seconds: float) -> float:
    """Throughput on uint8 tiles already on the device (preprocessing included)."""
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=lm.device)
    encode_images(lm, x, precision)  # warm-up
    sync(lm.device)
    n, t0 = 0, time.perf_counter()
    while True:
        encode_images(lm, x, precision)
        n += batch
        sync(lm.device)
        if time.perf_counter() - t0 >= seconds:
            break
    return n / (time.perf_counter() - t0)


def slide_grid(path: Path):  # type: ignore[no-untyped-def]
    from wsi_assist import slide, tiling, tissue
    from wsi_assist.lowres import read_lowres
    from wsi_assist.settings import TilingParams, TissueParams

    info = slide.describe(path)
    with slide.open_slide(path) as s:
        overview, ds = read_lowres(s, info, 8.0)
    found = tissue.detect(overview, ds, info.require_mpp(), TissueParams())
    return tiling.grid(info, found.geometry, TilingParams())


def stream_embed(lm: LoadedModel, path: Path, batch: int, precision: str,
                 max_tiles: int) -> dict[str, float]:
    from dataclasses import replace

    from wsi_assist.stream import stream

    g = slide_grid(path)
    n = min(len(g), max_tiles)
    g = replace(g, coords=g.coords[:n], tissue_fraction=g.tissue_fraction[:n])
    enc = TorchEncoder(lm, precision)
    embed_batches(enc, stream(path, g, batch_size=batch), n)  # warm: page cache, kernels
    res = embed_batches(enc, stream(path, g, batch_size=batch), n)
    sync(lm.device)
    return {"tiles": n, "tiles_per_s": res.tiles_per_s,
            "input_wait_fraction": res.input_wait_s / res.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated")
    ap.add_argument("--seconds", type=float, default=None, help="per measurement")
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--max-tiles", type=int, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sizes = [int(b) for b in (args.batch_sizes or ("64,128,256,512" if cuda else "1,8"))
             .split(",")]
    seconds = args.seconds or (3.0 if cuda else 4.0)
    precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = random_pathclip(args.device)
    dev_name = (torch.cuda.get_device_name(args.device) if cuda
                else f"cpu x{torch.get_num_threads()}")
    print(f"device: {dev_name}; PathCLIP architecture, random weights, 224 px")
    model: dict[str, float] = {}
    base = None
    for p in precisions:
        for b in sizes:
            ips = images_per_s(lm, b, p, seconds)
            base = base or ips
            model[f"{p}_b{b}"] = ips
            print(f"model  {p:5s} batch {b:4d}: {ips:9.1f} images/s  ({ips / base:.2f}x "
                  f"fp32 batch {sizes[0]})")
    best_key = max(model, key=model.get)  # type: ignore[arg-type]
    p_best, b_best = best_key.split("_b")
    e2e = None
    if args.slide.is_file():
        e2e = stream_embed(lm, args.slide, int(b_best), p_best,
                           args.max_tiles or (100_000 if cuda else 16))
        ratio = e2e["tiles_per_s"] / model[best_key]
        print(f"stream+embed {args.slide.name} ({e2e['tiles']} tiles, {p_best} batch "
              f"{b_best}): {e2e['tiles_per_s']:.1f} tiles/s = {ratio:.2f}x model alone; "
              f"waiting for input {100 * e2e['input_wait_fraction']:.0f}% of the time")
        e2e["ratio_to_model"] = ratio
    else:
        print(f"stream+embed skipped: {args.slide} not found", file=sys.stderr)
    print(json.dumps({"device": dev_name, "images_per_s": model, "best": best_key,
                      "stream_embed": e2e}))


if __name__ == "__main__":
    main()
