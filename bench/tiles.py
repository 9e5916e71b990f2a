"""Tile streaming benchmark: decode limit vs naive read_region loop vs wsi_assist stream.

    python3 bench/tiles.py SLIDE [--cores N] [--mpp 0.5] [--tile 224]
    python3 bench/tiles.py --synthetic 40000 [--cores N]
    python3 bench/tiles.py SLIDE --peer lazyslide [--peer-python VENV/bin/python]

All figures come from one process and one grid (every tile of the slide at the target
mpp). MP/s counts source-level pixels (read_px^2 per tile), the unit of the decode limit.
(a) decode limit: the level's compressed chunks read into memory, decoded by one thread
with tifffile's decoder (imagecodecs), times the cores used. (b) naive: one tiffslide
``read_region`` per tile. (c) stream: ``wsi_assist.stream.stream`` with N threads; also
with ``engine="zarr"`` (tiffslide's zarr store instead of our pread+decode path).
Peak RSS is the whole process's. MP/cpu-s (pixels per CPU-second) shows efficiency when other
processes share the cores; wall-clock rates suffer from them. The last line is a JSON object.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapely

from wsi_assist.chunks import tiff_page
from wsi_assist.slide import describe, open_slide
from wsi_assist.stream import stream, stream_naive
from wsi_assist.tiling import TileGrid, TilingParams, grid

log = logging.getLogger("bench.tiles")


def write_synthetic(path: Path, size: int, tile: int = 256, mpp: float = 0.5) -> Path:
    """A size x size px Aperio-style JPEG pyramid, fast: 16 distinct rendered tiles are
    JPEG-encoded once and their bytes repeated (levels /4 reuse them too)."""
    import tifffile

    from wsi_assist.synthetic import default_slide

    spec = default_slide(4 * tile, 4 * tile)
    tiles = [spec.render(x * tile, y * tile, tile, tile, 1.0, 1.0)
             for y in range(4) for x in range(4)]
    sample = path.with_suffix(".sample.tif")
    opts = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 90},
            "photometric": "rgb", "metadata": None}
    tifffile.imwrite(sample, np.concatenate([np.concatenate(tiles[r * 4:r * 4 + 4], 1)
                                             for r in range(4)]), **opts)
    with tifffile.TiffFile(sample) as tf:
        page = tf.pages[0]
        fh = tf.filehandle
        encoded = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            encoded.append(fh.read(cnt))
        tables = page.jpegtables
    sample.unlink()

    def segments(w: int, h: int):  # type: ignore[no-untyped-def]
        n = -(-w // tile) * -(-h // tile)
        for i in range(n):
            yield encoded[(i * 7 + i // 13) % len(encoded)]

    sizes = [(size, size)]
    while sizes[-1][0] // 4 >= 1024:
        sizes.append((sizes[-1][0] // 4, sizes[-1][1] // 4))
    desc = (f"Aperio Image Library v12.0.15\r\n{size}x{size} [0,0 {size}x{size}] "
            f"({tile}x{tile}) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}|Title = bench")
    extra = {"jpegtables": tables} if tables else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (w, h) in enumerate(sizes):
            tw.write(segments(w, h), shape=(h, w, 3), dtype=np.uint8,
                     description=desc if i == 0 else "Aperio Image Library v12.0.15",
                     **opts, **extra)
    return path


def full_grid(path: Path, mpp: float, tile: int) -> TileGrid:
    info = describe(path)
    return grid(info, shapely.box(0, 0, info.width, info.height),
                TilingParams(target_mpp=mpp, tile_px=tile, min_tissue=0.0))


def decode_limit(path: Path, level: int, cores: int, max_chunks: int, repeat: int = 1
                 ) -> tuple[float, float, float]:
    """Single-thread decode rate of the level's chunks (MP/s) times ``cores``; MP
    decoded per CPU-second of that thread; and MP/s of ``cores`` threads decoding
    (what the shared machine actually gives right now)."""
    with open_slide(path) as slide:
        page = tiff_page(slide, level)
        if page is None:
            raise SystemExit(f"{path}: level {level} is not a plain TIFF page; no decode limit")
        n = len(page.dataoffsets)
        pick = np.unique(np.linspace(0, n - 1, min(n, max_chunks)).astype(int))
        fd = os.open(str(path), os.O_RDONLY)
        try:
            data = [os.pread(fd, int(page.databytecounts[i]), int(page.dataoffsets[i]))
                    for i in pick]
        finally:
            os.close(fd)
        kw = {"jpegtables": page.jpegtables}
        if page.is_ndpi:
            kw["jpegheader"] = page.jpegheader
        decode = page.decode
        decode(data[0], int(pick[0]), **kw)  # warm up
        dt = cpu = float("inf")
        for _ in range(repeat):
            px = 0
            t, c = time.perf_counter(), time.thread_time()
            for d, i in zip(data, pick, strict=True):
                seg = decode(d, int(i), **kw)[0]
                px += seg.shape[-3] * seg.shape[-2]
            dt, cpu = min(dt, time.perf_counter() - t), min(cpu, time.thread_time() - c)
        pooled = float("inf")
        with ThreadPoolExecutor(cores) as ex:
            for _ in range(repeat):
                t = time.perf_counter()
                list(ex.map(lambda di: decode(di[0], int(di[1]), **kw)[0].shape,
                            zip(data, pick, strict=True)))
                pooled = min(pooled, time.perf_counter() - t)
    return px / dt / 1e6 * cores, px / cpu / 1e6, px / pooled / 1e6


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(make, repeat: int, limit: int | None = None  # type: ignore[no-untyped-def]
          ) -> tuple[int, float, float]:
    """Tiles consumed, wall seconds and process CPU seconds of the fastest of ``repeat``
    runs, each stopping after ``limit`` tiles. ``make()`` returns a batch iterator."""
    best = (0, float("inf"), float("inf"))
    for _ in range(repeat):
        n, t, c = 0, time.perf_counter(), cpu_seconds()
        for b in make():
            n += len(b)
            if limit is not None and n >= limit:
                break
        run = (n, time.perf_counter() - t, cpu_seconds() - c)
        best = min(best, run, key=lambda r: r[1])
    return best


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


def report(name: str, n: int, dt: float, cpu: float, read_px: int) -> float:
    mps = n * read_px * read_px / dt / 1e6
    log.info("%-22s %7d tiles %8.2f s %9.1f tiles/s %8.1f MP/s  %6.1f MP/cpu-s", name, n,
             dt, n / dt, mps, n * read_px * read_px / cpu / 1e6)
    return mps


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", nargs="?", type=Path)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--synthetic", type=int, metavar="PX", help="write and bench a PX^2 slide")
    ap.add_argument("--baseline-tiles", type=int, default=2000,
                    help="tiles for the naive and zarr runs (the rate is what counts)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="best of N runs for each rate (0: 3 below 5000 tiles, else 1)")
    ap.add_argument("--decode-chunks", type=int, default=2000)
    ap.add_argument("--peer", choices=["lazyslide"])
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter with LazySlide installed (e.g. a venv's python)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore", UserWarning)
    cpus = sorted(os.sched_getaffinity(0))
    if a.cores < 1 or a.cores > len(cpus):
        ap.error(f"--cores must be in 1..{len(cpus)}")
    os.sched_setaffinity(0, cpus[:a.cores])
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
    log.info("%s: %d tiles of %d px (read %d px at level %d), cores=%d, load %s", a.slide,
             len(g), g.tile_px, g.read_px, g.level, a.cores,
             " ".join(f"{v:.2f}" for v in os.getloadavg()))
    rep = a.repeat or (3 if len(g) < 5000 else 1)
    limit, decode_cpu, decode_threads = decode_limit(a.slide, g.level, a.cores,
                                                     a.decode_chunks, rep)
    log.info("%-22s %48.1f MP/s  %6.1f MP/cpu-s", f"decode limit 1 core x{a.cores}", limit,
             decode_cpu)
    log.info("%-22s %48.1f MP/s", f"decode in {a.cores} threads", decode_threads)
    naive = report("naive read_region", *timed(lambda: stream_naive(a.slide, g, a.batch),
                                               rep, a.baseline_tiles), g.read_px)
    zarr = report("stream engine=zarr", *timed(
        lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores, engine="zarr"), rep,
        a.baseline_tiles), g.read_px)
    n, dt, cpu = timed(lambda: stream(a.slide, g, a.batch, a.prefetch, a.cores), rep)
    fast = report("stream", n, dt, cpu, g.read_px)
    out: dict[str, object] = {
        "slide": a.slide.name, "tiles": len(g), "cores": a.cores,
        "decode_limit_mps": round(limit, 1), "naive_mps": round(naive, 1),
        "zarr_stream_mps": round(zarr, 1), "stream_mps": round(fast, 1),
        "stream_tiles_per_s": round(n / dt, 1),
        "ratio_to_limit": round(fast / limit, 3), "ratio_to_naive": round(fast / naive, 2),
        "ratio_to_zarr": round(fast / zarr, 2),
        "decode_threads_mps": round(decode_threads, 1),
        "ratio_to_threaded_decode": round(fast / decode_threads, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "decode_mp_per_cpu_s": round(decode_cpu, 1),
        "stream_mp_per_cpu_s": round(n * g.read_px ** 2 / cpu / 1e6, 1),
        "cpu_ratio_to_limit": round(n * g.read_px ** 2 / cpu / 1e6 / decode_cpu, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if a.peer == "lazyslide":
        peer = lazyslide_rate(a.peer_python, a.slide, a.mpp, a.tile, a.baseline_tiles)
        out["lazyslide_tiles_per_s"] = None if peer is None else round(peer["warm"], 1)
        out["lazyslide_cold_tiles_per_s"] = None if peer is None else round(peer["cold"], 1)
        out["ratio_to_lazyslide"] = None if peer is None else round(n / dt / peer["warm"], 2)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
