"""Captioning throughput: captions/s and tokens/s, batched vs one tile at a time.

    python3 bench/caption.py [--tiles 16] [--batch 8] [--new-tokens 16] [--size tiny|7b]
                             [--device cpu|cuda]
                             [--threads 1]

Builds a random-weight LLaVA (``tiny``: about 0.1 M params; ``7b``: LLaVA-1.5-7B
architecture, GPU only) in a temp folder, loads it through ``Captioner`` (the stage's
code path), and captions the same tiles with batch size 1 (the baseline, measured in
this run) and ``--batch``. Every caption is forced to ``--new-tokens`` tokens so both
runs decode the same amount. Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the tiny random LLaVA is a test fixture (tests/random_vlm.py), not part of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import random_vlm

from wsi_assist.models.captioner import Captioner, build_prompt


def measure(cap: Captioner, tiles: list[np.ndarray], prompts: list[str], batch: int,
            new_tokens: int) -> dict[str, float]:
    cap.caption(tiles[:batch], prompts[:batch], new_tokens, batch)  # warm-up
    t0 = time.perf_counter()
    out = cap.caption(tiles, prompts, new_tokens, batch,
                      sampling={"min_new_tokens": new_tokens})
    dt = time.perf_counter() - t0
    tokens = sum(c.n_tokens for c in out)
    return {"batch": batch, "seconds": dt, "captions_per_s": len(out) / dt,
            "tokens_per_s": tokens / dt, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: a tiny model is overhead-bound and more "
                         "threads only add synchronisation on a shared machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    size = random_vlm.llava7b() if args.size == "7b" else random_vlm.VlmSize()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(args.tiles)]
    prompts = [build_prompt("Describe this H&E tile. {findings}",
                            {"class": "Tumor", "prob": 0.5 + i / (4 * args.tiles),
                             "submodels": {"ki67": {"counts": {"positive": i}}}})
               for i in range(args.tiles)]
    with tempfile.TemporaryDirectory() as tmp:
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        t0 = time.perf_counter()
        random_vlm.build_llava(Path(tmp) / "m", size, dtype=dtype)
        cap = Captioner(str(Path(tmp) / "m"), args.device)
        load_s = time.perf_counter() - t0
        base = measure(cap, tiles, prompts, 1, args.new_tokens)
        fast = measure(cap, tiles, prompts, args.batch, args.new_tokens)
    n_params = sum(p.numel() for p in cap.model.parameters())
    for r in (base, fast):
        print(f"batch {r['batch']:>3}: {r['captions_per_s']:8.2f} captions/s "
              f"{r['tokens_per_s']:9.1f} tokens/s ({r['seconds']:.2f} s)")
    ratio = fast["captions_per_s"] / base["captions_per_s"]
    print(f"batched / one-at-a-time: {ratio:.2f}x")
    print(json.dumps({"bench": "caption", "size": args.size, "device": args.device,
                      "threads": args.threads,
                      "params": n_params, "dtype": str(cap.model.dtype),
                      "tiles": args.tiles, "new_tokens": args.new_tokens,
                      "build_load_s": round(load_s, 2), "baseline": base, "batched": fast,
                      "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
