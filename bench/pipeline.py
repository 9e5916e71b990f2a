"""Whole-pipeline cost per tile: the default run against ``tile`` alone, in one process.

Runs one slide through the batch (``batch.process_slide``, a fresh output folder each
time) twice, interleaved over ``--rounds`` (best of each): ``tile`` (stages tissue,
tiles) and the default run (every stage of the default config; those without a model,
such as embed without PathCLIP weights, are "not run" as in a user's run). Prints per
stage ms per tile of the default run, decodes per tile (compressed chunks decoded
divided by the distinct chunks the run needed: 1.0 when each is decoded once; the
overview and thumbnail reads of ``lowres``, other levels read once, not counted), the
default run's wall divided by ``tile``'s (target <= 1.5 on the 40k synthetic slide),
and the built-in nuclei's rate inside the pass against the stage's own path alone
(``bench/submodels.py``'s runtime: ``nuclei.analyse`` over a stream of the haloed
blocks) on the same tiles, in the same run (target >= 0.9). ``--separate`` adds the
default run with every tile stage reading the slide in a pass of its own (the layout
before the shared pass) as a baseline. Each run is a batch of one: its Chromium for the
report PDF is opened around it as ``batch.run_batch`` opens it (started in the
background when the slide starts, closed after), and its wall time includes both.

``--device cuda`` (needs a GPU; CI skips it) also configures ``embed`` with random
weights in PathCLIP's released layout (open_clip ViT-B-16, quick GELU, a plain
state_dict), bf16, and reports the encoder's images/s alone (tiles already in memory)
and the fraction of it the full pass sustains (the embed consumer's tiles/s inside it).
Both in batches of ``--embed-batch`` (256). ``--embed`` does the same on any device (on
the CPU: a check of this path, slowly; ``--encoder-images`` sets how many images the
encoder's own rate is timed over).

Peers: tiatoolbox, where it is importable here or in ``--peer-python`` (a venv of its
own), runs its ``tile`` on the same slide (``bench/peer_tiatoolbox.py --read``: open,
its Otsu mask, ``SlidingWindowPatchExtractor`` at 0.5 um/px, 224 px, and every patch
read), reported as ms per tile beside ours. LazySlide and TRIDENT: whether each is
importable is printed; their pipelines are not driven from here.

    python bench/pipeline.py SLIDE | --synthetic 40000 [--slide-mpp 0.25] [--rounds 1]
                             [--device cpu|cuda] [--embed] [--encoder-images N]
                             [--embed-batch B]
                             [--separate] [--no-nuclei | --stages a,b]
                             [--peer-python VENV/bin/python]

``--synthetic PX`` writes a PX^2 H&E-like slide (``synthetic.write_large``: tissue-sized
ellipses, nuclei sized in um, every level a true downsample) at ``--slide-mpp`` um/px
[0.25, a 40x scan], read at 0.5 um/px as the default config does. ``--no-nuclei`` drops
the ``submodels`` stage (whose default sub-model is the built-in nuclei, about 12 tiles/s
on one core) from the default run; ``--stages`` gives the default run's stages outright.
Both are printed and recorded in the JSON (``run_stages``).

Last line: a JSON object (``decodes_per_tile``, ``run_to_tile``, ``ms_per_tile`` per
stage, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_assist import batch, chunks, config, files, lowres
from wsi_assist.report import browser, pdf
from wsi_assist.settings import TilingParams
from wsi_assist.stages import REGISTRY, tilepass

log = logging.getLogger("bench.pipeline")
PEERS = {"lazyslide": "LazySlide", "trident": "TRIDENT", "tiatoolbox": "tiatoolbox"}


class Probe:
    """Counts chunk decodes and keeps every tile pass's report and consumers."""

    def __init__(self) -> None:
        self.decodes: Counter = Counter()
        self.passes: list[tuple[tilepass.PassReport, list[tilepass.Consumer]]] = []

    @contextmanager
    def installed(self) -> Iterator[Probe]:
        # DCT-scaled reads (a 0.25 um/px level read at 0.5) decode through ScaledUnits
        classes = [chunks.TiffUnits, chunks.ZarrUnits, chunks.ScaledUnits]
        saved = [c.decode for c in classes]
        real_pass, real_open = tilepass.run_pass, lowres.open_units
        overview_sources: list[Any] = []  # not the tile stream's; kept: ids not reused

        def counting(real):  # type: ignore[no-untyped-def]
            def decode(src: Any, uy: int, ux: int) -> np.ndarray:
                if not any(src is o for o in overview_sources):
                    self.decodes[(id(src), uy, ux)] += 1
                return real(src, uy, ux)
            return decode

        def open_units(*args: Any) -> Any:
            overview_sources.append(real_open(*args))
            return overview_sources[-1]

        def spy(slide: Any, consumers: list[tilepass.Consumer]) -> tilepass.PassReport:
            report = real_pass(slide, consumers)
            self.passes.append((report, consumers))
            return report

        for c, real in zip(classes, saved, strict=True):
            c.decode = counting(real)  # type: ignore[method-assign]
        tilepass.run_pass = spy  # type: ignore[assignment]
        lowres.open_units = open_units
        try:
            yield self
        finally:
            for c, real in zip(classes, saved, strict=True):
                c.decode = real  # type: ignore[method-assign]
            tilepass.run_pass = real_pass  # type: ignore[assignment]
            lowres.open_units = real_open

    def decodes_per_chunk(self) -> float:
        return sum(self.decodes.values()) / max(1, len(self.decodes))


@contextmanager
def separate_passes() -> Iterator[None]:
    """Every tile stage reads the slide in a pass of its own (its ``run``)."""
    saved = dict(REGISTRY)
    for name, stage in saved.items():
        REGISTRY[name] = dataclasses.replace(stage, open_pass=None)
    try:
        yield
    finally:
        REGISTRY.update(saved)


def make_config(stages: list[str] | None, device: str, pathclip: Path | None,
                embed_batch: int = 256) -> config.Config:
    d = config.load().to_dict()
    if stages is not None:
        d["stages"] = stages
    d["parallelism"]["device"] = device
    if pathclip is not None:
        d["embed"].update({"pathclip": str(pathclip), "precision": "bf16",
                           "batch_size": embed_batch})
    return config.from_dict(d)


def one_run(slide: Path, out: Path, cfg: config.Config) -> dict[str, Any]:
    probe = Probe()
    with probe.installed():
        t0 = time.perf_counter()
        # the batch's one Chromium for PDFs, as ``run_batch`` opens it (a batch of one)
        with browser.shared(pdf.batch_browser(files.work_dir(out))
                            if "report" in cfg.stages and cfg.report.pdf else None):
            r = batch.process_slide(slide, slide.stem, out, cfg, force=True)
        wall = time.perf_counter() - t0
    if r.status != "done":
        raise SystemExit(f"{slide}: the run failed in {r.stage}: {r.error}")
    if not r.n_tiles:
        raise SystemExit(f"{slide}: no tissue tiles; nothing to measure")
    return {"wall": wall, "n_tiles": r.n_tiles or 0, "seconds": dict(r.seconds),
            "decodes_per_tile": probe.decodes_per_chunk(), "passes": probe.passes,
            "out": out / slide.stem}


def nuclei_alone(slide: Path, folder: Path, rounds: int) -> tuple[float, int]:
    """Seconds of the built-in analysis by its own path (a stream of the haloed blocks)
    over the stored tiles of ``folder``; and the tiles."""
    from wsi_assist.settings import NucleiParams
    from wsi_assist.slide import describe
    from wsi_assist.stages import nuclei as builtin
    from wsi_assist.store import SlideStore
    from wsi_assist.stream import stream

    store = SlideStore(folder, mode="r")
    grid, params = store.read_grid(), NucleiParams()
    stains = builtin.slide_stains(store, params.stains)
    blocks, block_of = builtin.analysis_grid(grid, params)
    size = describe(slide).level_dimensions[grid.level]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        builtin.analyse(stream(slide, blocks, batch_size=builtin.BATCH), grid, blocks,
                        block_of, stains, params, size)
        best = min(best, time.perf_counter() - t0)
    return best, len(grid)


def qc_speed(rounds: int = 5) -> tuple[float, float]:
    """ms per 224 px tile of ``qc.scores`` and of the former per-pixel formulation (a
    channel minimum over the strided half-resolution view), same tiles."""
    from wsi_assist import qc

    def before(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = tiles[:, ::2, ::2]
        bg = (half.min(axis=3) > qc.WHITE).mean(axis=(1, 2))
        return bg.astype(np.float32), qc.laplacian_variance(half.astype(np.float32) @ qc.LUMA)

    tiles = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), np.uint8)
    best = {}
    for name, fn in (("now", qc.scores), ("before", before)):
        fn(tiles)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn(tiles)
            times.append(time.perf_counter() - t0)
        best[name] = 1000 * min(times) / len(tiles)
    return best["now"], best["before"]


def encoder_rate(pathclip: Path, device: str, n: int = 2048, bs: int = 256) -> float:
    """Images/s of the configured encoder (bf16) over tiles already in memory."""
    from wsi_assist.models.embed import make_encoder
    from wsi_assist.models.pathclip import configured_spec
    from wsi_assist.settings import EmbedParams

    params = EmbedParams(pathclip=str(pathclip), precision="bf16", batch_size=bs)
    spec = configured_spec(params)
    if spec is None:
        raise SystemExit(f"{pathclip}: not usable as PathCLIP weights")
    enc = make_encoder(spec, params, device)
    tiles = np.random.default_rng(0).integers(0, 256, (bs, 224, 224, 3), np.uint8)
    enc.fetch(enc.submit(tiles))  # warm-up
    t0 = time.perf_counter()
    pending = None
    for _ in range(n // bs):
        h = enc.submit(tiles)
        if pending is not None:
            enc.fetch(pending)
        pending = h
    enc.fetch(pending)
    return n // bs * bs / (time.perf_counter() - t0)


def random_pathclip(path: Path) -> Path:
    """Random weights in pathclip-base.pt's layout (an open_clip state_dict)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True, load_weights=False)
    torch.save(model.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", nargs="?", type=Path)
    ap.add_argument("--synthetic", type=int, metavar="PX", help="write and bench a PX^2 slide")
    ap.add_argument("--slide-mpp", type=float, default=0.25,
                    help="level-0 um/px of the synthetic slide (default 0.25, a 40x scan)")
    ap.add_argument("--stages", help="the default run's stages, comma separated "
                                     "(default: the config's)")
    ap.add_argument("--no-nuclei", action="store_true",
                    help="the default run without the submodels stage (built-in nuclei)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--embed", action="store_true",
                    help="configure embed with random PathCLIP weights, bf16 (default "
                         "with a device other than cpu)")
    ap.add_argument("--encoder-images", type=int, default=2048,
                    help="images the encoder's own rate is timed over (default 2048)")
    ap.add_argument("--embed-batch", type=int, default=256,
                    help="the encoder's batch, alone and in the pass (default 256)")
    ap.add_argument("--separate", action="store_true",
                    help="also the default run with a pass per tile stage (baseline)")
    ap.add_argument("--peer-python", help="a Python with tiatoolbox, for its figure")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("wsi_assist", "distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore", UserWarning)
    with tempfile.TemporaryDirectory(prefix="wsi-bench-pipeline-") as tmp:
        return _bench(a, ap, Path(tmp))


def _bench(a: argparse.Namespace, ap: argparse.ArgumentParser, tmp: Path) -> dict[str, Any]:
    if a.synthetic:
        from wsi_assist.synthetic import he_slide, write_large

        a.slide = write_large(tmp / f"synthetic-{a.synthetic}.svs",
                              he_slide(a.synthetic, a.synthetic, a.slide_mpp), a.slide_mpp)
    if a.slide is None:
        ap.error("give SLIDE or --synthetic PX")
    pathclip = random_pathclip(tmp / "pathclip-base.pt") \
        if a.embed or a.device != "cpu" else None
    cfg_tile = make_config(["tissue", "tiles"], a.device, None)
    cfg_run = make_config(run_stages(a), a.device, pathclip, a.embed_batch)
    a.run_stages = list(cfg_run.stages)
    print("default run stages: " + ", ".join(a.run_stages))
    tile, run, sep = None, None, None
    for i in range(a.rounds):  # interleaved, best of each
        t = one_run(a.slide, tmp / f"tile{i}", cfg_tile)
        r = one_run(a.slide, tmp / f"run{i}", cfg_run)
        tile = t if tile is None or t["wall"] < tile["wall"] else tile
        run = r if run is None or r["wall"] < run["wall"] else run
        if a.separate:
            with separate_passes():
                s = one_run(a.slide, tmp / f"sep{i}", cfg_run)
            sep = s if sep is None or s["wall"] < sep["wall"] else sep
    if tile is None or run is None:
        ap.error("--rounds must be >= 1")
    return _report(a, tile, run, sep, pathclip)


def run_stages(a: argparse.Namespace) -> list[str] | None:
    """The default run's stages: ``--stages``, or the config's less ``submodels`` with
    ``--no-nuclei``; None: the config's own."""
    if a.stages:
        return [x.strip() for x in a.stages.split(",") if x.strip()]
    if a.no_nuclei:
        return [x for x in config.load().stages if x != "submodels"]
    return None


def _report(a: argparse.Namespace, tile: dict[str, Any], run: dict[str, Any],
            sep: dict[str, Any] | None, pathclip: Path | None) -> dict[str, Any]:
    n = max(1, run["n_tiles"])
    ms = {k: round(1000 * v / n, 3) for k, v in run["seconds"].items()}
    out: dict[str, Any] = {
        "slide": str(a.slide.name), "n_tiles": run["n_tiles"], "device": a.device,
        "run_stages": getattr(a, "run_stages", None),
        "tile_wall_s": round(tile["wall"], 2), "run_wall_s": round(run["wall"], 2),
        "run_to_tile": round(run["wall"] / tile["wall"], 3),
        "decodes_per_tile": round(run["decodes_per_tile"], 3),
        "tile_decodes_per_tile": round(tile["decodes_per_tile"], 3), "ms_per_tile": ms,
        "run_ms_per_tile": round(1000 * run["wall"] / n, 3),
        "tile_ms_per_tile": round(1000 * tile["wall"] / n, 3)}
    print(f"{a.slide.name}: {run['n_tiles']} tiles; tile {tile['wall']:.2f} s, default run "
          f"{run['wall']:.2f} s: run/tile {out['run_to_tile']:.2f} (target <= 1.5); "
          f"decodes per tile {out['decodes_per_tile']:.2f} (target 1.0)")
    print("ms per tile by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    for report, consumers in run["passes"]:
        print(f"  pass over {report.carrier}: {report.seconds:.2f} s; busy "
              + ", ".join(f"{c.name} {c.busy_s:.2f} s" for c in consumers))
    if sep is not None:
        out |= {"separate_run_to_tile": round(sep["wall"] / tile["wall"], 3),
                "separate_decodes_per_tile": round(sep["decodes_per_tile"], 3)}
        print(f"baseline, a pass per tile stage: run/tile {out['separate_run_to_tile']:.2f}, "
              f"decodes per tile {out['separate_decodes_per_tile']:.2f}")
    now, before = qc_speed()
    out |= {"qc_ms_per_tile": round(now, 3), "qc_ms_per_tile_before": round(before, 3)}
    print(f"tile QC: {now:.3f} ms per tile, {before:.3f} before vectorising "
          f"({before / now:.1f}x)")
    out |= _nuclei_ratio(a, run)
    if pathclip is not None:
        out |= _gpu(a, run, pathclip)
    out |= _tiatoolbox(a, out["tile_ms_per_tile"])
    for mod, name in PEERS.items():
        if f"peer_{mod}" in out:
            continue
        have = importlib.util.find_spec(mod) is not None
        out[f"peer_{mod}"] = "installed, not driven" if have else "not installed"
        print(f"peer {name}: {out[f'peer_{mod}']}; no figure")
    print(json.dumps(out))
    return out


def _tiatoolbox(a: argparse.Namespace, ours_ms: float) -> dict[str, Any]:
    """tiatoolbox's ``tile`` on the same slide, in its own process (its imports untimed)."""
    python = sys.executable if importlib.util.find_spec("tiatoolbox") else a.peer_python
    if python is None:
        return {}
    script = Path(__file__).resolve().parent / "peer_tiatoolbox.py"
    p = subprocess.run([python, str(script), str(a.slide), "--rounds", "1", "--read",
                        "--min-mask-ratio", str(TilingParams().min_tissue)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0 or not p.stdout.strip():
        print(f"peer tiatoolbox: failed ({p.stderr.strip().splitlines()[-1:]})")
        return {"peer_tiatoolbox": "failed"}
    r = json.loads(p.stdout.strip().splitlines()[-1])[0]
    n = max(r["read_tiles"], 1)
    ms = 1000 * r["total_s"] / n
    fig = {"tiles": r["read_tiles"], "tile_ms_per_tile": round(ms, 3),
           "read_ms_per_tile": round(1000 * r["read_s"] / n, 3),
           "vs_ours": round(ms / ours_ms, 2)}
    print(f"peer tiatoolbox: {fig['tiles']} tiles (its Otsu mask, patch grid and every "
          f"patch read): {ms:.2f} ms per tile against our tile's {ours_ms:.2f} "
          f"(tiatoolbox / ours {fig['vs_ours']:.2f})")
    return {"peer_tiatoolbox": fig}


def _nuclei_ratio(a: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    walls = [r.seconds for r, cs in run["passes"] if any(c.name == "nuclei" for c in cs)]
    if not walls or not run["n_tiles"]:
        return {}
    alone, n = nuclei_alone(a.slide, run["out"], max(1, a.rounds))
    ratio = alone / walls[0]
    print(f"built-in nuclei: {n / walls[0]:.1f} tiles/s inside the pass (with every other "
          f"consumer), {n / alone:.1f} tiles/s by its own path alone: "
          f"{100 * ratio:.0f}% (target >= 90%)")
    return {"nuclei_tiles_per_s_pipeline": round(n / walls[0], 1),
            "nuclei_tiles_per_s_alone": round(n / alone, 1),
            "nuclei_pipeline_to_alone": round(ratio, 3)}


def _gpu(a: argparse.Namespace, run: dict[str, Any], pathclip: Path) -> dict[str, Any]:
    from wsi_assist.models.embed import used_precision
    from wsi_assist.settings import EmbedParams

    bs = max(1, min(a.embed_batch, a.encoder_images))
    rate = encoder_rate(pathclip, a.device, max(a.encoder_images, bs), bs)
    precision = used_precision(EmbedParams(precision="bf16"), a.device)
    done = batch.read_done(run["out"]) or {}
    # the embed consumer's own rate inside the pass: its tiles over the time from its
    # first batch asked for to its last embedding (waits for tiles included)
    sustained = float(done.get("summary", {}).get("embed", {}).get("tiles_per_s", 0.0))
    # a pass goes at the pace of its slowest consumer (each is fed through a short queue)
    busiest = max((c for _, cs in run["passes"] for c in cs), key=lambda c: c.busy_s,
                  default=None)
    bound = busiest.name if busiest is not None else None
    print(f"PathCLIP {precision} on {a.device}, batches of {bs}: {rate:.0f} images/s "
          f"alone; the full pass {sustained:.0f} tiles/s: {100 * sustained / rate:.0f}% "
          f"(target >= 80%); busiest consumer of the pass: {bound}")
    if bound != "embed":
        print(f"  the pass was paced by {bound}, not the encoder (the built-in nuclei run "
              "on the CPU: measure the encoder's share with --no-nuclei)")
    return {"pathclip_precision": precision, "pathclip_batch": bs,
            "pathclip_images_per_s": round(rate, 1),
            "pass_tiles_per_s": round(sustained, 1),
            "pass_to_pathclip": round(sustained / rate, 3), "pass_bound_by": bound}


if __name__ == "__main__":
    main()
