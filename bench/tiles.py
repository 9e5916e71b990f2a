"""Tile streaming benchmark: decode limit vs naive read_region loop vs wsi_assist stream.

    python3 bench/tiles.py SLIDE [--cores N] [--target-mpp 0.5] [--tile 224] [--rounds R]
    python3 bench/tiles.py --synthetic 40000 [--cores N] [--target-mpp 0.5]
    python3 bench/tiles.py SLIDE --peer lazyslide [--peer-python VENV/bin/python]

All figures come from one process and one grid (every tile of the slide at the target
mpp; by default the slide's level-0 mpp, read without resizing). The synthetic slide is
a 40x scan (0.25 um/px at level 0), so ``--target-mpp 0.5`` is the common case of a 40x
slide read at 20x: ``read_px = 2 * tile_px`` level-0 pixels per tile. MP/s counts
source-level pixels (read_px^2 per tile), the unit of the decode limit.
Each round measures, back to back:
(b) naive: one tiffslide ``read_region`` per tile; tiffslide's zarr store through the
stream (``engine="zarr"``); the stream with the slide's opening timed (``stream_cold``).
(a) decode limit: a sample of the level's compressed chunks, read into memory, decoded by
one thread pinned to each core in turn into one reused buffer (the stream's own decoder,
``TiffUnits.decode_chunk``; where the stream decodes at reduced scale in the DCT domain,
``ScaledUnits.decode_chunk`` at that scale, so the limit is the rate at which those
level-0 chunks can be decoded at all, and ``full_decode_limit_mps`` is the full-scale
rate they would cost decoded in full, and ``full_decode_stream_tiles_per_s`` the stream
over the same grid decoding in full and area-reducing, as it did before, timed in the
same round); the per-core rates summed. Also the sample decoded by N
threads at once (``decode_threads``): what the cores give together.
(c) stream: ``wsi_assist.stream.stream`` with N threads over the whole grid, repeated
for 0.3 s at least, the slide already open (the decode limit does not open it either).
(a) again; the round's limit is the mean of the two.
Rates and ratios are medians over rounds: the cores of these shared machines change
speed from minute to minute (one core alone has been seen decoding at 200 and at
340 MP/s), so each ratio is taken within a round.
Peak RSS is the whole process's. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapely

from wsi_assist import stream as stream_mod
from wsi_assist.chunks import SOURCES
from wsi_assist.settings import TilingParams
from wsi_assist.slide import describe
from wsi_assist.stream import reduced_source, stream, stream_naive
from wsi_assist.tiling import TileGrid, grid

log = logging.getLogger("bench.tiles")


def write_synthetic(path: Path, size: int, tile: int = 256, mpp: float = 0.25) -> Path:
    """A size x size px Aperio-style JPEG pyramid, fast: 16 distinct rendered tiles are
    JPEG-encoded once and their bytes repeated (levels /4 reuse them too)."""
    import tifffile

    from wsi_assist.synthetic import default_slide, encoded_tiles

    spec = default_slide(4 * tile, 4 * tile)
    tiles = [spec.render(x * tile, y * tile, tile, tile, 1.0, 1.0)
             for y in range(4) for x in range(4)]
    opts = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 90},
            "photometric": "rgb", "metadata": None}
    encoded, tables = encoded_tiles(
        path.with_suffix(".sample.tif"),
        np.concatenate([np.concatenate(tiles[r * 4:r * 4 + 4], 1) for r in range(4)]), opts)

    def segments(w: int, h: int):  # type: ignore[no-untyped-def]
        n = -(-w // tile) * -(-h // tile)
        for i in range(n):
            yield encoded[(i * 7 + i // 13) % len(encoded)]

    sizes = [(size, size)]
    while sizes[-1][0] // 4 >= 1024:
        sizes.append((sizes[-1][0] // 4, sizes[-1][1] // 4))
    desc = (f"Aperio Image Library v12.0.15\r\n{size}x{size} [0,0 {size}x{size}] "
            f"({tile}x{tile}) JPEG/RGB Q=90|AppMag = {round(10 / mpp)}|MPP = {mpp}|"
            "Title = bench")
    extra = {"jpegtables": tables} if tables else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (w, h) in enumerate(sizes):
            tw.write(segments(w, h), shape=(h, w, 3), dtype=np.uint8,
                     description=desc if i == 0 else "Aperio Image Library v12.0.15",
                     **opts, **extra)
    return path


def full_grid(path: Path, mpp: float | None, tile: int) -> TileGrid:
    """Every tile of the slide at ``mpp`` (None: its level-0 mpp)."""
    info = describe(path)
    return grid(info, shapely.box(0, 0, info.width, info.height),
                TilingParams(target_mpp=mpp or info.require_mpp(), tile_px=tile,
                             min_tissue=0.0))


def chunk_decoder(src: Any) -> tuple[Any, tuple[int, int]]:
    """(decode(data, i, out), unit shape) of the stream's decoder for ``src``: a
    ``TiffUnits`` or the ``ScaledUnits`` of :func:`stream.reduced_source`."""
    if hasattr(src, "factor"):  # one chunk straight into packed RGB, as the stream does
        return (lambda d, i, out: src.decode_chunk(d, out)), (*src.chunk_shape, 3)
    return src.decode_chunk, (*src.unit_shape, 3)


def decode_sample(src: Any, max_chunks: int) -> list[tuple[int, bytes | None, int]]:
    """(index, compressed bytes, rows) of up to ``max_chunks`` chunks spread over the
    level of ``src`` (a ``TiffUnits``)."""
    pick = np.unique(np.linspace(0, src.n_chunks - 1, min(src.n_chunks, max_chunks))
                     .astype(int)).tolist()
    return [(i, src.read_chunk(i), src.chunk_rows(i)) for i in pick]


def pixels(src: Any, sample: list[tuple[int, bytes | None, int]]) -> int:
    return sum(rows for _, _, rows in sample) * src.unit_shape[1]


def decode_rate(src: Any, data: list, min_s: float = 0.2, dec: Any = None
                ) -> tuple[float, float]:
    """MP/s (level pixels of the chunks) and MP per CPU-second of one thread decoding
    ``data`` into one buffer with ``dec`` (:func:`chunk_decoder`; default the full-scale
    decoder of ``src``), over and over for at least ``min_s`` seconds."""
    decode, shape = dec or chunk_decoder(src)
    f = src.unit_shape[0] // shape[0]
    buf = np.empty(shape, np.uint8)
    decode(data[0][1], data[0][0], buf[:data[0][2] // f])  # warm up
    px = pixels(src, data)
    t, c, done = time.perf_counter(), time.thread_time(), 0
    while not done or time.perf_counter() - t < min_s:
        for i, d, r in data:
            decode(d, i, buf[:r // f])
        done += px
    return done / (time.perf_counter() - t) / 1e6, done / (time.thread_time() - c) / 1e6


def decode_limit(src: Any, data: list, cpus: list[int], dec: Any = None
                 ) -> tuple[float, float, float]:
    """Sum over ``cpus`` of one pinned thread's decode rate (MP/s); the mean MP per
    CPU-second; and MP/s of len(cpus) threads decoding the sample together."""
    rates, per_cpu = [], []
    for cpu in cpus:
        os.sched_setaffinity(0, {cpu})  # this thread only
        try:
            r, c = decode_rate(src, data, dec=dec)
        finally:
            os.sched_setaffinity(0, cpus)
        rates.append(r)
        per_cpu.append(c)
    parts = [data[k::len(cpus)] for k in range(len(cpus))]
    with ThreadPoolExecutor(len(cpus)) as ex:
        pooled = sum(r for r, _ in ex.map(lambda part: decode_rate(src, part, dec=dec),
                                          parts))
    return sum(rates), float(np.mean(per_cpu)), pooled


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(make, limit: int | None = None, before=None,  # type: ignore[no-untyped-def]
          min_s: float = 0.0) -> tuple[int, float, float]:
    """Tiles consumed, wall and process CPU seconds of running ``make()`` (a batch
    iterator) until ``limit`` tiles, and again until ``min_s`` seconds have passed
    (small slides take milliseconds); ``before()`` runs untimed first."""
    if before is not None:
        before()
    n, t, c = 0, time.perf_counter(), cpu_seconds()
    while True:
        for b in make():
            n += len(b)
            if limit is not None and n >= limit:
                break
        if time.perf_counter() - t >= min_s:
            return n, time.perf_counter() - t, cpu_seconds() - c


PEER_SCRIPT = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import lazyslide as zs
from wsidata import open_wsi
path, tile, mpp, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
wsi = open_wsi(path)
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, tile, mpp=mpp)
rates = []
for _ in range(2):  # first (cold) pass, then warm
    n, t = 0, time.perf_counter()
    for _ in wsi.iter.tile_images("tiles"):
        n += 1
        if n >= limit:
            break
    rates.append(n / (time.perf_counter() - t))
print(json.dumps({"tiles": n, "cold": rates[0], "warm": rates[1]}))
"""


def lazyslide_rate(python: str, path: Path, mpp: float, tile: int, limit: int
                   ) -> dict[str, float] | None:
    """LazySlide's tile iteration (its default reader), in ``python``: cold and warm
    tiles/s, or None when LazySlide cannot be imported there."""
    import subprocess

    r = subprocess.run([python, "-c", PEER_SCRIPT, str(path), str(tile), str(mpp),
                        str(limit)], check=False, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        log.warning("--peer lazyslide failed in %s: %s", python,
                    (r.stderr.strip().splitlines() or ["?"])[-1])
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    log.info("%-22s %7d tiles %19.1f tiles/s warm (%.1f cold)", "lazyslide", out["tiles"],
             out["warm"], out["cold"])
    return out


def measure_round(a: argparse.Namespace, g: TileGrid, src: Any, sample: list,
                  cpus: list[int], r: int, dec: Any) -> dict[str, float]:
    """One round of (b), (a), (c), (a); rates in MP/s and their ratios."""
    mp = g.read_px ** 2 / 1e6  # per tile
    naive = timed(lambda: stream_naive(a.slide, g, a.batch), a.baseline_tiles, min_s=0.2)
    zarr = timed(lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores, engine="zarr"),
                 a.baseline_tiles, min_s=0.2)
    cold = timed(lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores),
                 before=SOURCES.clear)
    before = decode_limit(src, sample, cpus, dec)
    n, dt, cpu = timed(lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores), min_s=0.3)
    after = decode_limit(src, sample, cpus, dec)
    full = decode_limit(src, sample, cpus)[0] if dec is not None else None
    exact = None
    if dec is not None:  # the same grid decoded in full and area-reduced, as before
        real = stream_mod.reduced_source
        stream_mod.reduced_source = lambda s, grid: (s, grid.level_coords(), grid.read_px)
        try:
            exact = timed(lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores),
                          min_s=0.3)
        finally:
            stream_mod.reduced_source = real
    limit, per_cpu_s, threaded = (float(np.mean(v)) for v in zip(before, after, strict=True))
    row = {"limit": limit, "threaded": threaded, "per_cpu_s": per_cpu_s,
           "naive": naive[0] * mp / naive[1], "zarr": zarr[0] * mp / zarr[1],
           "cold": cold[0] * mp / cold[1], "stream": n * mp / dt,
           "stream_cpu": n * mp / cpu, "tiles_s": n / dt,
           "full_limit": limit if full is None else full,
           "exact_tiles_s": n / dt if exact is None else exact[0] / exact[1]}
    row |= {"r_limit": row["stream"] / limit, "r_naive": row["stream"] / row["naive"],
            "r_cold": row["cold"] / limit, "r_threaded": row["stream"] / threaded,
            "r_full": row["stream"] / row["full_limit"],
            "r_exact": row["tiles_s"] / row["exact_tiles_s"]}
    log.info("round %d: limit %6.1f MP/s (threads %6.1f), naive %5.1f, zarr %5.1f, "
             "stream %6.1f (cold %6.1f) MP/s, %7.1f tiles/s; ratio to limit %.3f, "
             "to naive %.1f", r + 1, limit, threaded, row["naive"], row["zarr"],
             row["stream"], row["cold"], row["tiles_s"], row["r_limit"], row["r_naive"])
    return row


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", nargs="?", type=Path)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--target-mpp", "--mpp", dest="mpp", type=float, default=None,
                    help="delivered um/px (default: the slide's level-0 mpp, no resize)")
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--synthetic", type=int, metavar="PX", help="write and bench a PX^2 slide")
    ap.add_argument("--baseline-tiles", type=int, default=1000,
                    help="tiles for the naive and zarr runs (the rate is what counts)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds of (limit, naive, stream); 0: 7 below 5000 tiles, else 3")
    ap.add_argument("--decode-chunks", type=int, default=1000)
    ap.add_argument("--peer", choices=["lazyslide"])
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter with LazySlide installed (e.g. a venv's python)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore", UserWarning)
    cpus = sorted(os.sched_getaffinity(0))
    if a.cores < 1 or a.cores > len(cpus):
        ap.error(f"--cores must be in 1..{len(cpus)}")
    cpus = cpus[:a.cores]
    os.sched_setaffinity(0, cpus)
    tmp = None
    if a.synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="wsi-bench-")
        t = time.perf_counter()
        a.slide = write_synthetic(Path(tmp.name) / f"synthetic-{a.synthetic}.svs", a.synthetic)
        log.info("wrote %s (%.0f MB) in %.1f s", a.slide, a.slide.stat().st_size / 1e6,
                 time.perf_counter() - t)
    if a.slide is None:
        ap.error("give SLIDE or --synthetic PX")
    g = full_grid(a.slide, a.mpp, a.tile)
    rounds = a.rounds or (7 if len(g) < 5000 else 3)
    log.info("%s: %d tiles of %d px (read %d px at level %d), cores=%d, %d rounds, load %s",
             a.slide, len(g), g.tile_px, g.read_px, g.level, a.cores, rounds,
             " ".join(f"{v:.2f}" for v in os.getloadavg()))
    with SOURCES.lease(str(a.slide), g.level, "tifffile") as src:
        sample = decode_sample(src, a.decode_chunks)
        reduced, _, px = reduced_source(src, g)
        dec = None if reduced is src else chunk_decoder(reduced)
        log.info("decoded at 1/%d scale%s", g.read_px // px,
                 " in the DCT domain" if dec is not None else "")
        rows = [measure_round(a, g, src, sample, cpus, r, dec) for r in range(rounds)]

    def med(k: str) -> float:
        return float(np.median([row[k] for row in rows]))

    out: dict[str, object] = {
        "slide": a.slide.name, "tiles": len(g), "cores": a.cores, "rounds": rounds,
        "target_mpp": round(g.delivered_mpp, 4), "read_px": g.read_px,
        "tile_px": g.tile_px, "decode_scale": g.read_px // px,
        "full_decode_limit_mps": round(med("full_limit"), 1),
        "ratio_to_full_decode_limit": round(med("r_full"), 3),
        "full_decode_stream_tiles_per_s": round(med("exact_tiles_s"), 1),
        "speedup_over_full_decode_stream": round(med("r_exact"), 2),
        "decode_limit_mps": round(med("limit"), 1), "naive_mps": round(med("naive"), 1),
        "zarr_stream_mps": round(med("zarr"), 1), "stream_mps": round(med("stream"), 1),
        "stream_cold_mps": round(med("cold"), 1), "stream_tiles_per_s": round(med("tiles_s"), 1),
        "ratio_to_limit": round(med("r_limit"), 3), "ratio_to_naive": round(med("r_naive"), 2),
        "cold_ratio_to_limit": round(med("r_cold"), 3),
        "ratio_to_limit_range": [round(min(r["r_limit"] for r in rows), 3),
                                 round(max(r["r_limit"] for r in rows), 3)],
        "decode_threads_mps": round(med("threaded"), 1),
        "ratio_to_threaded_decode": round(med("r_threaded"), 3),
        "decode_mp_per_cpu_s": round(med("per_cpu_s"), 1),
        "stream_mp_per_cpu_s": round(med("stream_cpu"), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if a.peer == "lazyslide":
        peer = lazyslide_rate(a.peer_python, a.slide, a.mpp, a.tile, a.baseline_tiles)
        out["lazyslide_tiles_per_s"] = None if peer is None else round(peer["warm"], 1)
        out["lazyslide_cold_tiles_per_s"] = None if peer is None else round(peer["cold"], 1)
        out["ratio_to_lazyslide"] = None if peer is None else round(
            med("tiles_s") / peer["warm"], 2)
    SOURCES.clear()
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
