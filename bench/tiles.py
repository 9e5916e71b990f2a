"""Tile streaming benchmark: decode limit vs naive read_region loop vs wsi_assist stream.

    python3 bench/tiles.py SLIDE [--cores N] [--mpp 0.5] [--tile 224]
    python3 bench/tiles.py --synthetic 40000 [--cores N]
    python3 bench/tiles.py SLIDE --peer lazyslide

All figures come from one process and one grid (every tile of the slide at the target
mpp). MP/s counts source-level pixels (read_px^2 per tile), the unit of the decode limit.
(a) decode limit: the level's compressed chunks read into memory, decoded by one thread
with tifffile's decoder (imagecodecs), times the cores used. (b) naive: one tiffslide
``read_region`` per tile. (c) stream: ``wsi_assist.stream.stream`` with N threads; also
with ``engine="zarr"`` (tiffslide's zarr store instead of our pread+decode path).
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapely  # noqa: E402

from wsi_assist.chunks import tiff_page  # noqa: E402
from wsi_assist.slide import describe, open_slide  # noqa: E402
from wsi_assist.stream import stream, stream_naive  # noqa: E402
from wsi_assist.tiling import TileGrid, TilingParams, grid  # noqa: E402

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


def decode_limit(path: Path, level: int, cores: int, max_chunks: int) -> float:
    """Single-thread decode rate of the level's chunks (MP/s), times ``cores``."""
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
        px = 0
        t = time.perf_counter()
        for d, i in zip(data, pick, strict=True):
            seg = decode(d, int(i), **kw)[0]
            px += seg.shape[-3] * seg.shape[-2]
        dt = time.perf_counter() - t
    return px / dt / 1e6 * cores


def timed(batches, limit: int | None = None) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Tiles consumed and seconds, stopping after ``limit`` tiles."""
    n, t = 0, time.perf_counter()
    for b in batches:
        n += len(b)
        if limit is not None and n >= limit:
            break
    return n, time.perf_counter() - t


def lazyslide_rate(path: Path, mpp: float, tile: int, limit: int) -> float | None:
    """LazySlide tiles/s over its own tile iteration (openslide reader), or None."""
    try:
        import lazyslide as zs
        from wsidata import open_wsi
    except ImportError as e:
        log.warning("--peer lazyslide: not importable (%s); pip install lazyslide", e)
        return None
    wsi = open_wsi(str(path))
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, tile, mpp=mpp)
    n, t = 0, time.perf_counter()
    for _ in wsi.iter.tile_images():
        n += 1
        if n >= limit:
            break
    return n / (time.perf_counter() - t)


def report(name: str, n: int, dt: float, read_px: int) -> float:
    mps = n * read_px * read_px / dt / 1e6
    log.info("%-22s %7d tiles %8.2f s %9.1f tiles/s %8.1f MP/s", name, n, dt, n / dt, mps)
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
    ap.add_argument("--decode-chunks", type=int, default=2000)
    ap.add_argument("--peer", choices=["lazyslide"])
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
    limit = decode_limit(a.slide, g.level, a.cores, a.decode_chunks)
    log.info("%-22s %48.1f MP/s", f"decode limit x{a.cores}", limit)
    naive = report("naive read_region", *timed(stream_naive(a.slide, g, a.batch),
                                               a.baseline_tiles), g.read_px)
    zarr = report("stream engine=zarr", *timed(stream(a.slide, g, a.batch, a.prefetch,
                                                      a.cores, engine="zarr"),
                                               a.baseline_tiles), g.read_px)
    n, dt = timed(stream(a.slide, g, a.batch, a.prefetch, a.cores))
    fast = report("stream", n, dt, g.read_px)
    out: dict[str, object] = {
        "slide": a.slide.name, "tiles": len(g), "cores": a.cores,
        "decode_limit_mps": round(limit, 1), "naive_mps": round(naive, 1),
        "zarr_stream_mps": round(zarr, 1), "stream_mps": round(fast, 1),
        "stream_tiles_per_s": round(n / dt, 1),
        "ratio_to_limit": round(fast / limit, 3), "ratio_to_naive": round(fast / naive, 2),
        "ratio_to_zarr": round(fast / zarr, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if a.peer == "lazyslide":
        rate = lazyslide_rate(a.slide, a.mpp, a.tile, a.baseline_tiles)
        out["lazyslide_tiles_per_s"] = None if rate is None else round(rate, 1)
        out["ratio_to_lazyslide"] = None if rate is None else round(n / dt / rate, 2)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
