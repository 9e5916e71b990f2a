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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_assist import __version__, files, locks, stages
from wsi_assist import config as config_mod
from wsi_assist.errors import WsiAssistError
from wsi_assist.report.index import write_batch_outputs
from wsi_assist.settings import Config
from wsi_assist.slide import SlideInfo, describe, find_slides, mpp_for, read_mpp_csv
from wsi_assist.store import SlideStore

log = logging.getLogger(__name__)
#: Tracebacks of failed slides: run.log keeps them; the console shows them only with --debug.
TRACE_LOG = logging.getLogger("wsi_assist.traceback")
TRACE_LOG.setLevel(logging.INFO)

MANIFEST_FIELDS = ["path", "slide_id", "status", "error", "stage", "n_tiles", "seconds",
                   "tiles_per_s", "warnings"]


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
    warnings: list[str] = field(default_factory=list)  # e.g. no tissue found

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
                "tiles_per_s": "" if tps is None else f"{tps:.1f}",
                "warnings": "; ".join(self.warnings)}


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


DONE_FILE = "done.json"


def read_done(folder: Path) -> dict[str, Any] | None:
    """The slide's done.json, or None when absent or unreadable."""
    d = files.read_json(folder / DONE_FILE)
    return d if isinstance(d, dict) else None


def process_slide(path: Path, slide_id: str, out: Path, config: Config,
                  mpp_table: dict[str, float] | None = None, force: bool = False,
                  ) -> SlideResult:
    """Run the stages of one slide that are not already done; never raises for a bad slide."""
    result = SlideResult(path=str(path), slide_id=slide_id, status="done")
    final = inside(out, out / slide_id)
    lock: locks.Lock | str | None = None
    try:
        fp = files.file_fingerprint(path)
        t0 = time.perf_counter()
        info = describe(path, mpp_override=mpp_for(path, config.mpp.override, mpp_table))
        result.seconds["open"] = time.perf_counter() - t0
        want = stages.fingerprints(fp, config, info)
        done = read_done(final)
        todo = stages.stages_to_run(done, want, config.stages, force)
        if not todo:
            return _skipped(result, done)
        lock = locks.acquire(inside(out, out / ".locks" / f"{slide_id}.lock"))
        if isinstance(lock, str):
            result.status, result.error = "skipped", f"being processed by {lock}"
            return result
        done = read_done(final)  # another run may have finished it meanwhile
        todo = stages.stages_to_run(done, want, config.stages, force)
        if not todo:
            return _skipped(result, done)
        log.info("start %s (%s): %s", slide_id, path, ", ".join(todo))
        _run_in_work_folder(path, slide_id, out, config, info, todo, done, want, fp, result)
    except Exception as e:  # one bad slide must not stop the batch
        result.status = "failed"
        result.stage = getattr(e, "stage", "open")
        result.error = _one_line(e, path)
        result.traceback = traceback.format_exc()
        log.error("%s failed in %s: %s", path, result.stage, result.error)
        TRACE_LOG.info("%s failed in %s:\n%s", path, result.stage, result.traceback)
    finally:
        if isinstance(lock, locks.Lock):
            lock.release()
    return result


def _run_in_work_folder(path: Path, slide_id: str, out: Path, config: Config,
                        info: SlideInfo, todo: tuple[str, ...], done: dict[str, Any] | None,
                        want: dict[str, str], fp: str, result: SlideResult) -> None:
    """Copy what is kept into a work folder, run ``todo`` there, swap it into place."""
    final = out / slide_id
    work = inside(out, out / ".work" / f"{slide_id}.{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    partial = done is not None and todo != config.stages and done.get("slide") == fp
    try:
        info.require_mpp()
        if partial:
            shutil.copytree(final, work)
            (work / DONE_FILE).unlink(missing_ok=True)
        else:
            work.mkdir()
        store = SlideStore(work, mode="a" if partial else "w")
        store.write_slide(path, info.mpp, info.mpp_source, info.synthetic, fp, __version__,
                          layout=info.layout, channels=info.channels)
        slide = stages.SlideContext(
            path=path, slide_id=slide_id, info=info, store=store,
            device=stages.resolve_device(config.parallelism.device),
            stream_params=config.stream, out_root=out, config_hash=config.section_hash(),
            stage_status=stages.stage_table)
        ran, seconds = stages.run_stages(slide, config, todo)
        result.seconds.update(seconds)
        kept = done if partial and done is not None else {}  # what the partial run keeps
        summary = {**kept.get("summary", {}), **ran}
        fingerprints = {**kept.get("stages", {}), **{s: want[s] for s in todo}}
        n_tiles = summary.get("tiles", {}).get("n_tiles")
        result.n_tiles = n_tiles
        result.warnings = stage_warnings(summary)
        files.write_json(work / DONE_FILE, {
            "slide_id": slide_id, "path": str(path), "slide": fp, "stages": fingerprints,
            "summary": summary, "seconds": result.seconds, "n_tiles": n_tiles,
            "info": info.to_json(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _swap_into_place(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _swap_into_place(work: Path, final: Path) -> None:
    """Replace ``final`` by ``work``: at every instant ``final`` is absent or complete."""
    old = work.with_name(work.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def _skipped(result: SlideResult, done: dict[str, Any] | None) -> SlideResult:
    result.status = "skipped"
    result.n_tiles = (done or {}).get("n_tiles")
    result.warnings = stage_warnings((done or {}).get("summary", {}))
    return result


def stage_warnings(summary: dict[str, Any]) -> list[str]:
    """The ``warnings`` the stages put in their summaries, in stage order, once each."""
    out: list[str] = []
    for s in summary.values():
        ws = s.get("warnings", []) if isinstance(s, dict) else []
        out += [str(w) for w in ws if str(w) not in out]
    return out


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file, or raise a WsiAssistError saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WsiAssistError(f"{out}: output folder is not writable "
                             f"({e.strerror or type(e).__name__})") from e


@dataclass(frozen=True)
class BatchPlan:
    """The slides of a run and their ids, found before any work starts."""

    paths: tuple[Path, ...]
    ids: dict[Path, str]
    mpp_table: dict[str, float] | None


def plan(inputs: list[Path], config: Config) -> BatchPlan:
    """Find slides and give them ids; raises WsiAssistError for unusable inputs."""
    missing = [p for p in inputs if not p.exists()]
    if missing:
        raise WsiAssistError(f"{missing[0]}: no such file or folder")
    paths = find_slides(inputs)
    ids = slide_ids(paths, [p if p.is_dir() else p.parent for p in inputs])
    table = read_mpp_csv(Path(config.mpp.csv)) if config.mpp.csv else None
    return BatchPlan(tuple(paths), ids, table)


def run_batch(inputs: list[Path], out: Path, config: Config, *, force: bool = False,
              client: Any = None, progress: Any = None,
              stop: Any = None) -> list[SlideResult]:
    """Process every slide of ``inputs`` into ``out``, locally or on a Dask ``client``.

    ``progress`` gets ``start(total)`` and ``advance(result)``; ``stop()`` returning True
    stops before the next slide starts (Ctrl-C). Writes manifest.csv and config.yaml.
    """
    check_writable(out)
    p = plan(inputs, config)
    config_mod.save(config, out / "config.yaml")
    if progress is not None:
        progress.start(len(p.paths))
    results: list[SlideResult] = []
    if client is None:
        for path in p.paths:
            if stop is not None and stop():
                break
            r = process_slide(path, p.ids[path], out, config, p.mpp_table, force)
            results.append(r)
            if progress is not None:
                progress.advance(r)
    else:
        results = _run_on_cluster(client, p, out, config, force, progress, stop)
    order = {str(path): i for i, path in enumerate(p.paths)}
    results.sort(key=lambda r: order[r.path])
    write_manifest(out / "manifest.csv", results)
    write_batch_outputs(out, [r.row() for r in results])
    return results


def _run_on_cluster(client: Any, p: BatchPlan, out: Path, config: Config, force: bool,
                    progress: Any, stop: Any) -> list[SlideResult]:
    """One task per slide; workers open the slides themselves. GPU stages need a worker
    declaring the ``GPU`` resource when the configured device is CUDA."""
    from dask.distributed import as_completed

    gpu = config.parallelism.device.startswith("cuda") and any(
        s in config.stages for s in ("embed", "submodels", "caption"))
    futures = [client.submit(process_slide, path, p.ids[path], out, config, p.mpp_table,
                             force, key=f"slide-{p.ids[path]}-{os.getpid()}", pure=False,
                             resources={"GPU": 1} if gpu else None)
               for path in p.paths]
    results = []
    for fut in as_completed(futures):
        r = fut.result()
        results.append(r)
        if progress is not None:
            progress.advance(r)
        if stop is not None and stop():
            for f in futures:
                f.cancel()  # running slides finish their atomic write or are discarded
            break
    return results


def write_manifest(path: Path, results: list[SlideResult]) -> None:
    with files.atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(r.row())


def _one_line(e: BaseException, path: Path) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, WsiAssistError):
        return msg
    return f"{path}: {type(e).__name__}: {msg}"
