"""Tissue detection + tile grid benchmark: wall time per step, against a baseline.

    python3 bench/tissue.py SLIDE [SLIDE...] [--rounds R] [--baseline OLD/tissue.py]
    python3 bench/tissue.py --synthetic 40000 /work/shared/slides/test3-DAPI-2-387.ndpi
    python3 bench/tissue.py --synthetic 40000 NDPI --peer tiatoolbox [--peer-python PY]

Steps, as the ``tissue`` and ``tiles`` stages run them: ``open`` (describe the slide),
``overview`` (``lowres.read_lowres`` at ``tissue.overview_mpp``), ``detect``
(``tissue.detect``), ``grid`` (``tiling.grid`` at 0.5 um/px, tissue fractions
included). ``--synthetic PX``: a PX^2 H&E-like slide at 0.25 um/px
(``synthetic.write_large``). ``--peer tiatoolbox`` also times tiatoolbox's Otsu mask +
patch grid (``bench/peer_tiatoolbox.py``: its default 1.25x mask, and the mask at our
overview's um/px, ``*_matched``) on each slide, a round of it beside each of ours
(alternating which runs first): imported here when this interpreter has it, else in a
process of ``--peer-python`` (a venv with tiatoolbox; its import is not timed).
``vs_peer`` is the median over rounds of its total over ours (>= 1: ours at least as
fast); ``vs_peer_matched`` the same with its mask at our overview's resolution.
``--baseline`` loads another version of ``tissue.py`` (e.g. main's, before
a change) as a module of its own and times its ``detect`` on the same overview in the
same process, round by round (alternating which runs first), so ``detect_speedup`` is
a ratio within one run; the overview is also read as before ``lowres`` (tiffslide's
``read_region``, numpy's mean over the strided block axes), checked equal, and timed
(``baseline_overview_s``);
``total_speedup`` is the baseline's total over ours, round by round. The
masks of both are compared (``mask_agreement``: fraction of equal overview cells).
Medians over rounds. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_assist import tiling, tissue
from wsi_assist.lowres import level_and_factor, read_lowres
from wsi_assist.settings import TilingParams, TissueParams
from wsi_assist.slide import describe, open_slide

log = logging.getLogger("bench.tissue")


def load_baseline(path: Path) -> ModuleType:
    """Another version of tissue.py as the module ``baseline_tissue``."""
    spec = importlib.util.spec_from_file_location("baseline_tissue", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_tissue"] = mod
    spec.loader.exec_module(mod)
    return mod


def read_overview(path: Path, info: Any, want: float, as_before: bool
                  ) -> tuple[np.ndarray, float, float]:
    """(overview, downsample, seconds); ``as_before``: read as before issue 17's
    ``lowres``: the level through tiffslide's ``read_region``, block means by numpy's
    mean over the strided block axes, rounded."""
    t = time.perf_counter()
    with open_slide(path) as s:
        if not as_before:
            image, ds = read_lowres(s, info, want)
            return image, ds, time.perf_counter() - t
        level, f = level_and_factor(info, max(want / info.require_mpp(), 1.0))
        w, h = info.level_dimensions[level]
        ow, oh = max(w // f, 1), max(h // f, 1)
        nc = len(info.channels) if info.multichannel else 3
        arr = s.read_region((0, 0), level, (ow * f, oh * f), as_array=True)[..., :nc]
        mean = arr.reshape(oh, f, ow, f, nc).mean(axis=(1, 3))
        image = mean.round().astype(arr.dtype)
    return image, float(info.level_downsamples[level] * f), time.perf_counter() - t


def one_round(path: Path, base: ModuleType | None, r: int) -> dict[str, Any]:
    """One round; with a baseline, ours and the baseline's run in turn, the first of the
    two alternating between rounds (the first read of a slide pays its page cache)."""
    params = TissueParams()
    t0 = time.perf_counter()
    info = describe(path)
    t_open = time.perf_counter() - t0
    mpp = info.require_mpp()
    want = tissue.overview_mpp(info.width, info.height, mpp, params, info.level_downsamples)
    order = (False, True) if r % 2 == 0 else (True, False)
    runs: dict[bool, Any] = {}
    for before in order if base is not None else (False,):
        image, ds, t_over = read_overview(path, info, want, before)
        det = base.detect if before and base is not None else tissue.detect
        t = time.perf_counter()
        found = det(image, ds, mpp, params)
        runs[before] = (image, found, t_over, time.perf_counter() - t)
    image, found, t_over, t_det = runs[False]
    t = time.perf_counter()
    g = tiling.grid(info, found.geometry, TilingParams(target_mpp=0.5))
    t_grid = time.perf_counter() - t
    row: dict[str, Any] = {"open": t_open, "overview": t_over, "detect": t_det,
                           "grid": t_grid, "total": t_open + t_over + t_det + t_grid,
                           "tiles": len(g), "overview_px": list(image.shape[:2]),
                           "overview_mpp": round(ds * mpp, 4),
                           "method": found.method}
    if base is not None:
        old_image, old, b_over, b_det = runs[True]
        if not np.array_equal(old_image, image):
            raise SystemExit(f"{path}: the overview differs from read_region and numpy's mean")
        row |= {"baseline_overview": b_over, "baseline_detect": b_det,
                "baseline_total": t_open + b_over + b_det + t_grid,
                "mask_agreement": float((old.mask == found.mask).mean()),
                "area_ratio": found.area_um2 / old.area_um2 if old.area_um2 else None}
    return row


def bench(path: Path, rounds: int, base: ModuleType | None, peer: Peer | None = None
          ) -> dict[str, Any]:
    rows = []
    for r in range(rounds):  # with a peer: its round beside ours, first on odd rounds
        q = peer.round(path, rows[-1]["overview_mpp"]) if peer is not None and r % 2 else None
        row = one_round(path, base, r)
        if peer is not None:
            row["peer"] = q if q is not None else peer.round(path, row["overview_mpp"])
        rows.append(row)

    def med(k: str) -> float:
        return float(np.median([r[k] for r in rows]))

    out: dict[str, Any] = {"slide": path.name, "tiles": rows[0]["tiles"],
                           "overview_px": rows[0]["overview_px"],
                           "method": rows[0]["method"], "overview_mpp": rows[0]["overview_mpp"]}
    out |= {f"{k}_s": round(med(k), 4) for k in ("open", "overview", "detect", "grid",
                                                  "total")}
    if base is not None:
        out["overview_speedup"] = round(float(np.median(
            [r["baseline_overview"] / r["overview"] for r in rows])), 2)
        out["baseline_detect_s"] = round(med("baseline_detect"), 4)
        out["baseline_overview_s"] = round(med("baseline_overview"), 4)
        out["baseline_total_s"] = round(med("baseline_total"), 4)
        out["total_speedup"] = round(float(np.median(
            [r["baseline_total"] / r["total"] for r in rows])), 2)
        out["detect_speedup"] = round(float(np.median(
            [r["baseline_detect"] / r["detect"] for r in rows])), 2)
        out["mask_agreement"] = round(rows[0]["mask_agreement"], 5)
        out["area_ratio"] = rows[0]["area_ratio"] and round(rows[0]["area_ratio"], 5)
    if peer is not None:
        q = rows[0]["peer"]
        out["peer"] = {"tiles": q["tiles"], "mask_px": q["mask_px"],
                       "mask_px_matched": q["mask_px_matched"],
                       "mask_fraction": round(q["mask_fraction"], 4)}
        out["peer"] |= {f"{k}_s": round(float(np.median([r["peer"][k] for r in rows])), 4)
                        for k in ("open", "mask", "grid", "total", "total_matched")}
        for key, of in (("vs_peer", "total"), ("vs_peer_matched", "total_matched")):
            out[key] = round(float(np.median([r["peer"][of] / r["total"] for r in rows])), 3)
        log.info("%s: ours %.3f s, tiatoolbox %.3f s (1.25x mask %s px), %.3f s with its "
                 "mask at our %.3f um/px: tiatoolbox / ours %.2f, %.2f", out["slide"],
                 out["total_s"], out["peer"]["total_s"], q["mask_px"],
                 out["peer"]["total_matched_s"], out["overview_mpp"], out["vs_peer"],
                 out["vs_peer_matched"])
    log.info("%s", json.dumps(out))
    return out


class Peer:
    """tiatoolbox's rounds (``bench/peer_tiatoolbox.py``), asked one at a time so they
    interleave with ours: in this interpreter when it has tiatoolbox, else in a
    ``--serve`` process of ``python``."""

    def __init__(self, python: str | None) -> None:
        here = Path(__file__).resolve().parent
        self.local: ModuleType | None = None
        self.proc: subprocess.Popen[str] | None = None
        if importlib.util.find_spec("tiatoolbox") is not None:
            sys.path.insert(0, str(here))
            import peer_tiatoolbox

            self.local = peer_tiatoolbox
        elif python is None:
            raise SystemExit("tiatoolbox is not importable here: give --peer-python PY")
        else:
            self.proc = subprocess.Popen([python, str(here / "peer_tiatoolbox.py"), "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)

    def round(self, path: Path, mpp: float) -> dict[str, Any]:
        ratio = TilingParams().min_tissue
        if self.local is not None:
            return dict(self.local.one_round(path, ratio, mpp))
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{path} {mpp} {ratio}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"tiatoolbox peer stopped (exit {self.proc.wait()})")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin:
            self.proc.stdin.close()
            self.proc.wait()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="*", type=Path)
    ap.add_argument("--synthetic", type=int, metavar="PX",
                    help="also a PX^2 H&E-like 40x slide (synthetic.write_large)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another tissue.py to compare detect with")
    ap.add_argument("--peer", choices=["tiatoolbox"], help="also time a peer's tissue + grid")
    ap.add_argument("--peer-python", help="interpreter that has the peer installed")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore", UserWarning)
    base = load_baseline(a.baseline) if a.baseline else None
    tmp = None
    slides = list(a.slides)
    if a.synthetic:
        from wsi_assist.synthetic import he_slide, write_large

        tmp = tempfile.TemporaryDirectory(prefix="wsi-bench-")
        slides.insert(0, write_large(Path(tmp.name) / f"synthetic-{a.synthetic}.svs",
                                     he_slide(a.synthetic, a.synthetic, 0.25), 0.25))
    if not slides:
        ap.error("give SLIDE or --synthetic PX")
    peer = Peer(a.peer_python) if a.peer else None
    try:
        results = [bench(p, a.rounds, base, peer) for p in slides]
    finally:
        if peer is not None:
            peer.close()
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
