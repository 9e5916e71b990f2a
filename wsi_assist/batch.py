"""Many slides into one output folder: slide ids, per-slide status, the manifest.

Each slide is processed in a temporary folder inside OUT and moved into place when its
stages are done; ``done.json`` is written last. A slide that fails is recorded with its
stage and a one-line error, and the batch goes on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import traceback
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_assist import __version__, files, locks, stages
from wsi_assist import config as config_mod
from wsi_assist.errors import WsiAssistError, in_words
from wsi_assist.report import browser, pdf
from wsi_assist.report.index import write_batch_outputs
from wsi_assist.settings import Config
from wsi_assist.slide import (
    SlideInfo,
    check_file,
    describe,
    find_slides,
    mpp_for,
    read_mpp_csv,
)
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
    #: Stage fingerprints this run wanted (None when the slide failed before them) and
    #: a digest of the done.json it last saw: :func:`as_out_is` compares them with what
    #: OUT holds when the manifest is written.
    want: dict[str, str] | None = None
    seen: str = ""
    #: Stages this run recorded as "not run", and why (said once per batch).
    not_run: dict[str, str] = field(default_factory=dict)

    @property
    def why_skipped(self) -> str:
        """Why a skipped slide was skipped, in words ("" unless skipped)."""
        if self.status != "skipped":
            return ""
        return self.error or ALREADY_DONE

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


#: Names of the batch's own files in OUT, which a slide folder must not take.
RESERVED = frozenset({"manifest.csv", "run.log", "config.yaml", "index.html", "summary.csv"})


def slide_ids(paths: list[Path], roots: list[Path]) -> dict[Path, str]:
    """Unique, stable folder names: the stem, plus a short hash of the path relative to
    its input root when two slides share a stem (of the shortest tail of their real
    paths that tells them apart, when two inputs hold the same relative path)."""
    stems: dict[str, list[Path]] = {}
    for p in paths:
        stems.setdefault(safe_name(p.stem).casefold(), []).append(p)
    out: dict[Path, str] = {}
    for group in stems.values():
        keys = _distinct_keys(group, roots) if len(group) > 1 else {}
        for p in group:
            name = safe_name(p.stem)
            if len(group) > 1:
                name = f"{name}-{hashlib.sha256(keys[p].encode()).hexdigest()[:8]}"
            if name.casefold() in RESERVED:
                name += "-slide"
            out[p] = name
    return out


def _distinct_keys(group: list[Path], roots: list[Path]) -> dict[Path, str]:
    """A different string per path of ``group``, the same in every run with the same
    inputs: the path relative to its input root where that is unique (what ids were
    always made of), else the shortest tail of the real path that is."""
    keys = {p: _relative_to_roots(p, roots) for p in group}
    count = Counter(keys.values())
    clash = [p for p in group if count[keys[p]] > 1]
    if not clash:
        return keys
    taken = {keys[p] for p in group if count[keys[p]] == 1}
    parts = {p: Path(os.path.realpath(p)).parts for p in clash}
    for k in range(2, max(len(v) for v in parts.values()) + 1):
        tails = {p: "/".join(parts[p][-k:]) for p in clash}
        if len(set(tails.values())) == len(clash) and not taken & set(tails.values()):
            return {**keys, **tails}
    # the same file reached twice: tell the paths apart by their order
    return {**keys, **{p: f"{os.path.realpath(p)}#{i}" for i, p in enumerate(clash)}}


def _relative_to_roots(p: Path, roots: list[Path]) -> str:
    rp = Path(os.path.realpath(p))  # never raises, even on a link loop
    for r in roots:
        try:
            return rp.relative_to(os.path.realpath(r)).as_posix()
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


#: The error of a slide skipped because another run holds its lock.
BUSY = "being processed by "
#: Why a slide whose stages are all done with the same settings is skipped.
ALREADY_DONE = "already done; --force to redo"


def process_slide(path: Path, slide_id: str, out: Path, config: Config,
                  mpp_table: dict[str, float] | None = None, force: bool = False,
                  ) -> SlideResult:
    """Run the stages of one slide that are not already done; never raises for a bad slide."""
    result = SlideResult(path=str(path), slide_id=slide_id, status="done")
    final = inside(out, out / slide_id)
    lock: locks.Lock | str | None = None
    phase = "open"  # what a failure outside the stages is reported as
    try:
        check_file(path)  # before anything opens it: a FIFO would block the run
        fp = files.file_fingerprint(path)
        t0 = time.perf_counter()
        info = describe(path, mpp_override=mpp_for(path, config.mpp.override, mpp_table))
        result.seconds["open"] = time.perf_counter() - t0
        want = result.want = stages.fingerprints(fp, config, info)
        done = read_done(final)
        result.seen = _digest(done)
        todo = stages.stages_to_run(done, want, config.stages, force)
        if not todo:
            return _skipped(result, done)
        info.require_mpp()
        phase = "write"
        lock = locks.acquire(inside(out, out / ".locks" / f"{slide_id}.lock"))
        if isinstance(lock, str):
            result.status, result.error = "skipped", f"{BUSY}{lock}"
            return result
        done = read_done(final)  # another run may have finished it meanwhile
        result.seen = _digest(done)
        todo = stages.stages_to_run(done, want, config.stages, force)
        if not todo:
            return _skipped(result, done)
        log.info("start %s (%s): %s", slide_id, path, ", ".join(todo))
        if "report" in todo and config.report.pdf:
            browser.warm_current()  # Chromium starts while the other stages run
        _run_in_work_folder(path, slide_id, out, config, info, todo, done, want, fp, result)
        result.seen = _digest(read_done(final))
    except Exception as e:  # one bad slide must not stop the batch
        result.status = "failed"
        result.stage = getattr(e, "stage", phase)
        result.error = _one_line(e, path, out, result.stage)
        result.traceback = traceback.format_exc()
        log.error("%s failed in %s: %s", path, result.stage, result.error)
        TRACE_LOG.info("%s failed in %s:\n%s", path, result.stage, result.traceback)
    finally:
        if isinstance(lock, locks.Lock):
            lock.release()
    return result


def _digest(done: dict[str, Any] | None) -> str:
    return "" if done is None else hashlib.sha256(
        json.dumps(done, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_in_work_folder(path: Path, slide_id: str, out: Path, config: Config,
                        info: SlideInfo, todo: tuple[str, ...], done: dict[str, Any] | None,
                        want: dict[str, str], fp: str, result: SlideResult) -> None:
    """Copy what is kept into a work folder, run ``todo`` there, swap it into place.
    An error outside the stages (preparing the folder, done.json, the swap) carries
    ``stage = "write"``."""
    final = out / slide_id
    work = inside(out, files.work_dir(out) / slide_id)
    shutil.rmtree(work, ignore_errors=True)
    partial = done is not None and todo != config.stages and done.get("slide") == fp
    try:
        if partial:
            shutil.copytree(final, work)
            (work / DONE_FILE).unlink(missing_ok=True)
        else:
            work.mkdir(parents=True)
        store = SlideStore(work, mode="a" if partial else "w")
        store.write_slide(path, info.mpp, info.mpp_source, info.synthetic, fp, __version__,
                          layout=info.layout, channels=info.channels)
        device = stages.run_device(config)
        slide = stages.SlideContext(
            path=path, slide_id=slide_id, info=info, store=store, device=device,
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
        result.not_run = {k: str(v["skipped"]) for k, v in ran.items()
                          if isinstance(v, dict) and "skipped" in v}
        files.write_json(work / DONE_FILE, {
            "slide_id": slide_id, "path": str(path), "slide": fp, "stages": fingerprints,
            "summary": summary, "seconds": result.seconds, "n_tiles": n_tiles,
            "device": device, "info": info.to_json(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _swap_into_place(work, final)
    except Exception as e:
        if not hasattr(e, "stage"):
            e.stage = "write"  # type: ignore[attr-defined]
        raise
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
    """Skipped as done: with the tile count and stage seconds its done.json records."""
    result.status, result.error, result.stage = "skipped", "", ""
    result.n_tiles = (done or {}).get("n_tiles")
    result.warnings = stage_warnings((done or {}).get("summary", {}))
    seconds = (done or {}).get("seconds")
    if isinstance(seconds, dict):
        result.seconds = {k: float(v) for k, v in seconds.items()
                          if isinstance(v, int | float)}
    return result


def stage_warnings(summary: dict[str, Any]) -> list[str]:
    """The ``warnings`` the stages put in their summaries, in stage order, once each."""
    out: list[str] = []
    for s in summary.values():
        ws = s.get("warnings", []) if isinstance(s, dict) else []
        out += [str(w) for w in ws if str(w) not in out]
    return out


def log_not_run(results: list[SlideResult]) -> list[str]:
    """One INFO line per stage and reason for the stages not run on this run's slides
    (instead of a line per slide); returns the lines."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        for stage, reason in r.not_run.items():
            groups.setdefault((stage, reason), []).append(r.slide_id)
    lines = []
    said: dict[str, str] = {}  # a reason -> the stage that gave it (said once)
    for (stage, reason), ids in groups.items():
        which = "all slides" if len(ids) == len(results) > 1 else \
            f"{len(ids)} slide(s): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
        before = next((t for t in said if reason.startswith(t)), None)
        if before is None:
            said[reason] = stage
        else:
            reason = f"as for {said[before]}{reason[len(before):]}"
        lines.append(f"{stage} not run on {which}: {reason}")
        log.info("%s", lines[-1])
    return lines


def as_out_is(results: list[SlideResult], out: Path, config: Config) -> list[SlideResult]:
    """The results brought up to what OUT holds now, for the manifest and the index:
    a slide that another run finished meanwhile is ``skipped`` (done) with that run's
    numbers, and one that another run was processing but left unfinished says so."""
    for r in results:
        if r.status == "done" or r.want is None:
            continue
        done = read_done(out / r.slide_id)
        finished = done is not None and not stages.stages_to_run(done, r.want,
                                                                 config.stages, False)
        if finished and _digest(done) != r.seen:
            _skipped(r, done)
        elif (r.status == "skipped" and r.error.startswith(BUSY)
              and locks.live_holder(out / ".locks" / f"{r.slide_id}.lock") is None):
            r.status = "failed"
            r.error = (f"{r.path}: another run ({r.error.removeprefix(BUSY)}) processed it "
                       "but did not finish it; run again to retry")
    return results


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file, or raise a WsiAssistError saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WsiAssistError(f"{out}: output folder is not writable "
                             f"({_os_reason(e, out)})") from e


def _os_reason(e: OSError, out: Path) -> str:
    """Why writing in ``out`` failed, naming the disk when it is full."""
    if files.is_no_space(e):
        return f"no space left on {files.disk_of(out)}"
    return in_words(e)


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what killed processes of this host left in OUT: their work folders
    (``.work/<host>.<pid>``, and ``.work/<id>.<pid>`` of older versions when no live
    lock covers them) and their temporary files; never what a live run is using."""
    work = out / files.WORK_DIR
    removed = files.remove_leftovers(work)
    legacy = re.compile(r"^(?P<id>.+)\.(?P<pid>\d+)(?:\.old)?$")
    for d in (list(work.iterdir()) if work.is_dir() else []):
        m = legacy.match(d.name)  # a slide folder itself: <id>.<pid>/slide.zarr
        if m is None or not (d / "slide.zarr").is_dir() or files.pid_alive(int(m["pid"])):
            continue
        holder = locks.live_holder(out / ".locks" / f"{m['id']}.lock")
        if holder is not None and holder[1] == int(m["pid"]):
            continue  # a live run of an older version on another host
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    cache = out / ".cache"
    for folder in (out, cache, *(d for d in (cache.iterdir() if cache.is_dir() else [])
                                  if d.is_dir())):
        removed += files.remove_leftovers(folder, temp_files_only=True)
    if removed:
        log.info("removed %d leftovers of killed runs: %s", len(removed),
                 ", ".join(str(p.relative_to(out)) for p in removed[:5])
                 + (" ..." if len(removed) > 5 else ""))
    return removed


#: Chromium profile folders that versions before 0.1.0's fixes made in $TMPDIR (now
#: Chromium's scratch is under ``OUT/.work/<host>.<pid>``, removed with it).
OLD_CHROMIUM_PREFIX = "wsi-assist-chromium-"
#: A profile folder with no Chromium lock this old is a leftover: a live run holds its
#: lock from a moment after making the folder until it removes it.
OLD_CHROMIUM_AGE_S = 600.0


def remove_chromium_leftovers(tmp: Path | None = None) -> list[Path]:
    """Remove ``$TMPDIR/wsi-assist-chromium-*`` profile folders left by dead processes:
    their Chromium lock (``SingletonLock`` -> ``<host>-<pid>``) names a dead pid of this
    host, or they have no lock and are older than :data:`OLD_CHROMIUM_AGE_S`; with each,
    the ``org.chromium.Chromium.*`` folder its ``SingletonSocket`` link points into."""
    import tempfile

    base = Path(tmp or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        found = sorted(base.glob(f"{OLD_CHROMIUM_PREFIX}*"))
    except OSError:
        return removed
    for d in found:
        if d.is_symlink() or not d.is_dir() or not _dead_profile(d):
            continue
        socket_dir = _link_parent(d / "SingletonSocket")
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        if socket_dir is not None and socket_dir.parent == base \
                and socket_dir.name.lstrip(".").startswith("org.chromium.Chromium."):
            shutil.rmtree(socket_dir, ignore_errors=True)
            removed.append(socket_dir)
    if removed:
        log.info("removed %d Chromium folders of dead runs from %s", len(removed), base)
    return removed


def _dead_profile(d: Path) -> bool:
    try:
        target = os.readlink(d / "SingletonLock")
    except FileNotFoundError:
        try:
            return time.time() - d.stat().st_mtime > OLD_CHROMIUM_AGE_S
        except OSError:
            return False
    except OSError:
        return False
    host, _, pid = target.rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not files.pid_alive(int(pid))


def _link_parent(link: Path) -> Path | None:
    try:
        return Path(os.readlink(link)).parent
    except OSError:
        return None


@dataclass(frozen=True)
class BatchPlan:
    """The slides of a run and their ids, found before any work starts."""

    paths: tuple[Path, ...]
    ids: dict[Path, str]
    mpp_table: dict[str, float] | None


def plan(inputs: list[Path], config: Config) -> BatchPlan:
    """Find slides and give them ids; raises WsiAssistError for unusable inputs."""
    # a broken link or link loop exists as an entry: it fails as a slide, not the run
    missing = [p for p in inputs if not os.path.lexists(p)]
    if missing:
        raise WsiAssistError(f"{missing[0]}: no such file or folder")
    paths = find_slides(inputs)
    ids = slide_ids(paths, [p if p.is_dir() else p.parent for p in inputs])
    table = read_mpp_csv(Path(config.mpp.csv)) if config.mpp.csv else None
    if table:
        warn_unmatched(Path(str(config.mpp.csv)), table, paths)
    return BatchPlan(tuple(paths), ids, table)


def warn_unmatched(csv_path: Path, table: dict[str, float], paths: list[Path]) -> list[str]:
    """Log (and return) the rows of an mpp CSV that match no input slide, by name."""
    known = {k for p in paths for k in (str(p), p.name, p.stem)}
    unmatched = [k for k in table if k not in known]
    if unmatched:
        log.warning("%s: %d row(s) match no input slide: %s", csv_path, len(unmatched),
                    ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
    return unmatched


class OutputsNotWritten(WsiAssistError):
    """The slides ran but manifest.csv (or the index) could not be written; ``results``
    holds what the run did."""

    def __init__(self, problems: list[str], results: list[SlideResult]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.results = results


def slide_folders(paths: list[Path]) -> list[Path]:
    """The slide folders to rebuild: each path that is one (holds slide.zarr), or every
    slide folder inside a batch output folder; a WsiAssistError for a missing path."""
    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise WsiAssistError(f"{p}: does not exist")
        inner = [] if (p / "slide.zarr").is_dir() else sorted(
            d for d in p.iterdir() if not d.name.startswith(".") and (d / "slide.zarr").is_dir())
        out.extend(inner or [p])  # a folder with neither: the rebuild says what is missing
    return out


def run_batch(inputs: list[Path], out: Path, config: Config, *, force: bool = False,
              client: Any = None, progress: Any = None,
              stop: Any = None) -> list[SlideResult]:
    """Process every slide of ``inputs`` into ``out``, locally or on a Dask ``client``.

    ``progress`` gets ``start(total)`` and ``advance(result)``; ``stop()`` returning True
    stops before the next slide starts (Ctrl-C). Writes manifest.csv and config.yaml;
    raises OutputsNotWritten (with the results) when the manifest cannot be written.
    """
    check_writable(out)
    remove_leftovers(out)
    remove_chromium_leftovers()
    p = plan(inputs, config)
    local = client is None or not config.parallelism.scheduler
    stages.check_models(config, local=local)
    try:
        config_mod.save(config, out / "config.yaml")
    except OSError as e:
        raise WsiAssistError(f"{out / 'config.yaml'}: cannot write the effective config "
                             f"({_os_reason(e, out)})") from e
    wants_gpu = config.parallelism.device.startswith("cuda")
    if local:  # ``auto`` resolved (and its fallback said) once here, not in every worker
        config = config_mod.override(config, parallelism={
            "device": stages.run_device(config)})
    if progress is not None:
        progress.start(len(p.paths))
    results: list[SlideResult] = []
    if client is None:
        with browser.shared(_batch_browser(out, config)):  # one Chromium for all PDFs
            for path in p.paths:
                if stop is not None and stop():
                    break
                try:
                    r = process_slide(path, p.ids[path], out, config, p.mpp_table, force)
                except KeyboardInterrupt:  # a second Ctrl-C: this slide is dropped
                    results.append(interrupted(path, p.ids[path]))
                    break
                results.append(r)
                if progress is not None:
                    progress.advance(r)
    else:
        results = _run_on_cluster(client, p, out, config, force, progress, stop, wants_gpu)
    with_pid = files.work_dir(out)
    with contextlib.suppress(OSError):
        with_pid.rmdir()  # empty unless a slide is still being written by this process
    order = {str(path): i for i, path in enumerate(p.paths)}
    results.sort(key=lambda r: order[r.path])
    log_not_run(results)
    results = as_out_is(results, out, config)
    problems = []
    try:
        write_manifest(out / "manifest.csv", results)
    except OSError as e:
        kept = "the previous one is kept" if (out / "manifest.csv").exists() else \
            "there is none"
        problems.append(f"{out / 'manifest.csv'}: not written ({_os_reason(e, out)}); "
                        f"{kept}")
    try:
        write_batch_outputs(out, [r.row() for r in results])
    except OSError as e:
        problems.append(f"{out / 'index.html'}, summary.csv: not written "
                        f"({_os_reason(e, out)})")
    if problems:
        raise OutputsNotWritten(problems, results)
    return results


def _batch_browser(out: Path, config: Config) -> browser.Browser | None:
    """The batch's Chromium for report PDFs (started on the first), when it makes any."""
    if "report" not in config.stages or not config.report.pdf:
        return None
    return pdf.batch_browser(files.work_dir(out))


def _run_on_cluster(client: Any, p: BatchPlan, out: Path, config: Config, force: bool,
                    progress: Any, stop: Any, wants_gpu: bool) -> list[SlideResult]:
    """One task per slide; workers open the slides themselves. GPU stages need a worker
    declaring the ``GPU`` resource when the configured device (``wants_gpu``) is CUDA."""
    from dask.distributed import as_completed

    gpu = wants_gpu and any(
        s in config.stages for s in ("embed", "submodels", "caption"))
    futures = {client.submit(process_on_worker, path, p.ids[path], out, config, p.mpp_table,
                             force, key=f"slide-{p.ids[path]}-{os.getpid()}", pure=False,
                             resources={"GPU": 1} if gpu else None): path
               for path in p.paths}
    results = []
    try:
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            if progress is not None:
                progress.advance(r)
            if stop is not None and stop():
                break
    except KeyboardInterrupt:  # a second Ctrl-C: slides still running are dropped
        finished = {r.path for r in results}
        results += [interrupted(path, p.ids[path]) for f, path in futures.items()
                    if str(path) not in finished and f.status != "pending"]
    finally:
        for f in futures:
            f.cancel()  # running slides finish their atomic write or are discarded
        _close_worker_browsers(client)
    return results


def process_on_worker(path: Path, slide_id: str, out: Path, config: Config,
                      mpp_table: dict[str, float] | None = None, force: bool = False,
                      ) -> SlideResult:
    """:func:`process_slide` on a Dask worker: its PDF printed by the worker process's
    one Chromium (started for its first slide, reused by the next), not one per slide."""
    shared = None
    if "report" in config.stages and config.report.pdf:
        shared = browser.for_process(files.work_dir(out), pdf.batch_browser)
    with browser.using(shared):
        return process_slide(path, slide_id, out, config, mpp_table, force)


def _close_worker_browsers(client: Any) -> None:
    """Stop the workers' Chromium processes at the end of a batch (their profiles are in
    OUT); a worker already gone has nothing to stop."""
    try:
        starts = client.run(browser.close_process_browsers, on_error="ignore")
    except (OSError, TimeoutError, RuntimeError) as e:
        log.debug("workers' chromium not closed: %s", e)
        return
    if starts:
        log.debug("chromium starts on the workers: %s", starts)


class IgnoreSigint:
    """A Dask worker plugin: the worker process ignores SIGINT. A Ctrl-C in the terminal
    reaches the whole process group, local worker processes included; the run (the first
    Ctrl-C: finish the running slides, the second: abort) decides, not each worker,
    which would otherwise die mid-slide. Registered for a local cluster only."""

    name = "wsi-assist-ignore-sigint"

    def setup(self, worker: Any) -> None:
        import signal

        with contextlib.suppress(ValueError):  # not the main thread: nothing to change
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_local_workers(client: Any) -> None:
    """Local worker processes (and those the nannies restart) ignore SIGINT."""
    from distributed import WorkerPlugin

    plugin = type("IgnoreSigintPlugin", (IgnoreSigint, WorkerPlugin), {})()
    client.register_plugin(plugin, name=IgnoreSigint.name)


def interrupted(path: Path, slide_id: str) -> SlideResult:
    """The manifest row of a slide dropped by a second Ctrl-C."""
    return SlideResult(path=str(path), slide_id=slide_id, status="failed", stage="interrupted",
                       error=f"{path}: interrupted by Ctrl-C before it finished; run the "
                             "same command again to process it")


def write_manifest(path: Path, results: list[SlideResult]) -> None:
    with files.atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(r.row())


def _one_line(e: BaseException, path: Path, out: Path, stage: str) -> str:
    """One line for the manifest: names the slide file, says what is wrong in words."""
    if files.is_no_space(e):
        what = "its results" if stage in ("open", "write") else f"its {stage} results"
        return (f"{path}: no space left on the disk {files.disk_of(out)} while writing "
                f"{what} to {out}")
    msg = in_words(e, f"unexpected error in {stage} (details in run.log)")
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg if str(path) in msg else f"{path}: {msg}"
