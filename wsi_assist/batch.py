"""Many slides into one output folder: slide ids, per-slide status, the manifest.

Each slide is processed in a temporary folder inside OUT and moved into place when its
stages are done; ``done.json`` is written last. A slide that fails is recorded with its
stage and a one-line error, and the batch goes on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_assist import config as config_mod
from wsi_assist import store
from wsi_assist.config import Config
from wsi_assist.errors import WsiAssistError
from wsi_assist.pipeline import SlideRun, run_stages
from wsi_assist.report.index import write_batch_outputs
from wsi_assist.slide import describe, mpp_for, read_mpp_csv

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["path", "slide_id", "status", "error", "stage", "n_tiles", "seconds",
                   "tiles_per_s"]


@dataclass
class SlideResult:
    """The outcome for one slide, as a manifest row."""

    path: str
    slide_id: str
    status: str  # done | failed | skipped
    error: str = ""
    stage: str = ""
    n_tiles: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    traceback: str = ""

    @property
    def tiles_per_s(self) -> float | None:
        total = sum(self.seconds.values())
        return self.n_tiles / total if self.n_tiles and total > 0 else None

    def row(self) -> dict[str, Any]:
        tps = self.tiles_per_s
        return {"path": self.path, "slide_id": self.slide_id, "status": self.status,
                "error": self.error, "stage": self.stage,
                "n_tiles": "" if self.n_tiles is None else self.n_tiles,
                "seconds": json.dumps({k: round(v, 3) for k, v in self.seconds.items()}),
                "tiles_per_s": "" if tps is None else f"{tps:.1f}"}


def safe_name(stem: str) -> str:
    """A folder name from a file stem: NFC, no path separators or control characters."""
    name = unicodedata.normalize("NFC", stem)
    name = re.sub(r'[\x00-\x1f/\\:*?"<>|]+', "_", name).strip(" .")
    return name[:120] or "slide"


def slide_ids(paths: list[Path], roots: list[Path]) -> dict[Path, str]:
    """Unique, stable folder names: the stem, plus a short hash of the path relative to
    its input root when two slides share a stem."""
    stems: dict[str, list[Path]] = {}
    for p in paths:
        stems.setdefault(safe_name(p.stem).casefold(), []).append(p)
    out: dict[Path, str] = {}
    for group in stems.values():
        for p in group:
            name = safe_name(p.stem)
            if len(group) > 1:
                rel = _relative_to_roots(p, roots)
                name = f"{name}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
            out[p] = name
    return out


def _relative_to_roots(p: Path, roots: list[Path]) -> str:
    rp = p.resolve()
    for r in roots:
        try:
            return rp.relative_to(r.resolve()).as_posix()
        except ValueError:
            continue
    return rp.as_posix()


def inside(base: Path, target: Path) -> Path:
    """``target`` if it lies inside ``base``; else a WsiAssistError (no writes outside OUT)."""
    b, t = base.resolve(), target.resolve()
    if b != t and b not in t.parents:
        raise WsiAssistError(f"refusing to write {target}: outside the output folder {base}")
    return target


def process_slide(path: Path, slide_id: str, out: Path, config: Config,
                  mpp_table: dict[str, float] | None = None) -> SlideResult:
    """Run the configured stages on one slide; never raises for a bad slide."""
    result = SlideResult(path=str(path), slide_id=slide_id, status="done")
    final = inside(out, out / slide_id)
    work = inside(out, out / ".work" / f"{slide_id}.{os.getpid()}")
    stage = "open"
    try:
        override = mpp_for(path, config.mpp.override, mpp_table)
        t0 = time.perf_counter()
        info = describe(path, mpp_override=override)
        info.require_mpp()
        result.seconds["open"] = time.perf_counter() - t0
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        group = store.open_store(work / "slide.zarr", mode="w")
        group.attrs.update({"slide_path": str(path), "mpp_source": info.mpp_source,
                            "slide_mpp": info.mpp, "synthetic": info.synthetic,
                            "wsi_assist_version": _version()})
        run = SlideRun(path=path, slide_id=slide_id, out_dir=work, config=config,
                       info=info, store=group)
        stage = "stages"
        result.seconds.update(run_stages(run, config.stages))
        tiles = run.summary.get("tiles", {})
        result.n_tiles = tiles.get("n_tiles")
        _write_json(work / "done.json", {"slide_id": slide_id, "path": str(path),
                                         "stages": list(config.stages),
                                         "summary": run.summary, "seconds": result.seconds,
                                         "info": info.to_json()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    except Exception as e:  # one bad slide must not stop the batch
        result.status = "failed"
        result.stage = getattr(e, "stage", stage)
        result.error = _one_line(e, path)
        result.traceback = traceback.format_exc()
        log.error("%s failed in %s: %s", path, result.stage, result.error)
        log.debug("%s", result.traceback)
        shutil.rmtree(work, ignore_errors=True)
    return result


def run_batch(inputs: list[Path], out: Path, config: Config) -> list[SlideResult]:
    """Process every slide found in ``inputs`` into ``out``; writes manifest and config."""
    from wsi_assist.slide import find_slides

    out.mkdir(parents=True, exist_ok=True)
    paths = find_slides(inputs)
    ids = slide_ids(paths, [p if p.is_dir() else p.parent for p in inputs])
    mpp_table = read_mpp_csv(Path(config.mpp.csv)) if config.mpp.csv else None
    config_mod.save(config, out / "config.yaml")
    results = [process_slide(p, ids[p], out, config, mpp_table) for p in paths]
    write_manifest(out / "manifest.csv", results)
    write_batch_outputs(out, [r.row() for r in results])
    shutil.rmtree(out / ".work", ignore_errors=True)
    return results


def write_manifest(path: Path, results: list[SlideResult]) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(r.row())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _one_line(e: BaseException, path: Path) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, WsiAssistError):
        return msg
    return f"{path}: {type(e).__name__}: {msg}"


def _version() -> str:
    from wsi_assist import __version__

    return __version__


def result_dicts(results: list[SlideResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
