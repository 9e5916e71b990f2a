"""The built-in nuclei's fast path against the straightforward one, in one process.

Cuts analysis blocks out of real slides (``../shared/slides``: CMU-1-Small-Region at
0.5 µm/px, OS-2-vsi-Ki67 at 0.35 µm/px) and times :func:`wsi_assist.nuclei.detect_nuclei`
on each, interleaved over ``--rounds`` (best of each):

- ``reference``: the analysis built on scikit-image's ``reconstruction``, whole-image
  ``h_maxima`` and public ``watershed`` (the code before the fast path), one block after
  another;
- ``fast``: the shipped code (one radix sort per reconstruction, h-maxima on the objects'
  boxes, the split floods straight into scikit-image's compiled loop), one block after
  another;
- ``fast, threads``: the shipped code over the blocks in the stage's thread pool
  (``nuclei.workers``, default one per core up to 4).

Checks that both give the same nuclei, and prints ms per block and per 256 px tile of
0.5 µm/px, and the ratios to the reference.

    python bench/nuclei_speed.py [--rounds 2] [--workers N]

Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_assist import nuclei as nu
from wsi_assist.settings import NucleiParams
from wsi_assist.stages import nuclei as stage
from wsi_assist.stain import StainVectors, default_vectors

SLIDES = Path(__file__).resolve().parents[2] / "shared" / "slides"
#: (file, mpp, stains, block side in px): blocks as the stage cuts them (512 µm + halo)
SOURCES = (("CMU-1-Small-Region.svs", 0.499, "brightfield-he", 1104),
           ("OS-2-vsi-Ki67.ome.tif", 0.3461, "brightfield-hdab", 722))
TILE_PX2 = 256 * 256  # one 256 px tile at 0.5 µm/px


def blocks() -> list[tuple[np.ndarray, float, StainVectors]]:
    import tiffslide

    out = []
    for name, mpp, kind, side in SOURCES:
        with tiffslide.TiffSlide(SLIDES / name) as s:
            w, h = s.dimensions
            img = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
        for y in range(0, h - side + 1, side):
            for x in range(0, w - side + 1, side):
                out.append((img[y:y + side, x:x + side], mpp, default_vectors(kind)))
    return out


@contextmanager
def reference() -> Iterator[None]:
    """The analysis on scikit-image's own reconstruction and h-maxima."""
    from skimage.morphology import h_maxima, reconstruction
    from skimage.segmentation import watershed

    saved = nu.reconstruct_by_dilation, nu.h_maxima_by_object, nu.watershed_lines
    nu.reconstruct_by_dilation = lambda s, m: reconstruction(s, m, method="dilation")
    nu.h_maxima_by_object = lambda e, m: h_maxima(e, 0.5).astype(bool)
    nu.watershed_lines = lambda i, k, m: watershed(i, k, mask=m, connectivity=1,
                                                   watershed_line=True)
    try:
        yield
    finally:
        nu.reconstruct_by_dilation, nu.h_maxima_by_object, nu.watershed_lines = saved


def timed(run: Callable[[], list[nu.Nuclei]]) -> tuple[float, list[nu.Nuclei]]:
    t0 = time.perf_counter()
    found = run()
    return time.perf_counter() - t0, found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args(argv)
    params = NucleiParams(workers=a.workers)
    work = blocks()
    n_tiles = sum(b.shape[0] * b.shape[1] * (mpp / 0.5) ** 2 for b, mpp, _ in work) / TILE_PX2

    def serial() -> list[nu.Nuclei]:
        return [nu.detect_nuclei(b, mpp, st, params) for b, mpp, st in work]

    def threaded() -> list[nu.Nuclei]:
        def job(i: int, _: np.ndarray) -> nu.Nuclei:
            b, mpp, st = work[i]
            return nu.detect_nuclei(b, mpp, st, params)
        got = stage._in_threads(job, ((i, w[0]) for i, w in enumerate(work)),
                                stage.workers(params))
        return [g for g in got if g is not None]

    best = {"reference": np.inf, "fast": np.inf, "fast, threads": np.inf}
    results: dict[str, list[nu.Nuclei]] = {}
    for _ in range(max(1, a.rounds)):
        with reference():
            t, results["reference"] = timed(serial)
        best["reference"] = min(best["reference"], t)
        for key, run in (("fast", serial), ("fast, threads", threaded)):
            t, results[key] = timed(run)
            best[key] = min(best[key], t)
    counts = {k: [len(f) for f in v] for k, v in results.items()}
    same = all(c == counts["reference"] for c in counts.values()) and all(
        np.array_equal(f.measurements, r.measurements, equal_nan=True)
        for k in ("fast", "fast, threads") for f, r in zip(results[k], results["reference"],
                                                           strict=True))
    print(f"{len(work)} blocks ({n_tiles:.0f} tiles of 256 px at 0.5 µm/px), "
          f"{sum(counts['reference'])} nuclei; same nuclei and measurements: {same}")
    for k, t in best.items():
        print(f"{k:>14}: {1000 * t / len(work):8.0f} ms/block {1000 * t / n_tiles:7.1f} "
              f"ms/tile  {best['reference'] / t:5.2f}x")
    out = {"blocks": len(work), "tiles": round(n_tiles, 1), "identical": same,
           "workers": stage.workers(params),
           "ms_per_tile": {k: round(1000 * t / n_tiles, 1) for k, t in best.items()},
           "speedup_fast": round(best["reference"] / best["fast"], 2),
           "speedup_fast_threads": round(best["reference"] / best["fast, threads"], 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
