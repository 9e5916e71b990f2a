"""`wsi-assist run INPUT... -o OUT`: the configured stages over every slide found."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wsi_assist.cli import options as opt
from wsi_assist.cli.common import state, user_errors
from wsi_assist.files import QuietFileHandler, remove_leftovers, work_dir

if TYPE_CHECKING:
    from dask.distributed import Client, LocalCluster

log = logging.getLogger("wsi_assist")


def run(
    inputs: opt.Inputs,
    out: opt.Out,
    config: opt.ConfigFile = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated stages: tissue, tiles, "
                                                    "embed, zeroshot, submodels, caption, "
                                                    "report.")] = None,
    mpp: opt.Mpp = None,
    mpp_csv: opt.MppCsv = None,
    workers: Annotated[int | None, typer.Option(help="Start a local Dask cluster with N "
                                                     "worker processes.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running Dask "
                                                       "scheduler, e.g. tcp://host:8786.")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    pathclip: Annotated[Path | None, typer.Option(help="PathCLIP weights "
                                                       "(pathclip-base.pt).")] = None,
    engine: Annotated[str | None, typer.Option(help="Embedding engine: torch or onnx.")]
    = None,
    prompts: Annotated[str | None, typer.Option(help="Zero-shot prompt set name or YAML "
                                                     "file.")] = None,
    query: Annotated[list[str] | None, typer.Option(
        "--query", help="Text query (repeatable): its nearest tiles by PathCLIP "
                        "similarity are captioned too (caption.queries).")] = None,
    providers: Annotated[str | None, typer.Option(
        help="onnxruntime providers for sub-models, in order: comma-separated from "
             "tensorrt, cuda, cpu (default: those available).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo slides that are already "
                                                        "done.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and the final "
                                                        "summary.")] = False,
) -> None:
    """Process slides into OUT. Exit 0 when all are done or skipped, 1 when any failed."""
    overrides: dict[str, dict[str, Any]] = {
        "parallelism": {"workers": workers, "scheduler": scheduler, "device": device},
        "embed": {"pathclip": str(pathclip) if pathclip else None, "engine": engine},
        "zeroshot": {"prompts": prompts}}
    if query:
        overrides["caption"] = {"queries": list(query)}
    if providers:
        overrides["submodels"] = {"providers": [p.strip() for p in providers.split(",")
                                                if p.strip()]}
    execute(inputs, out, config, stages=stages, mpp=mpp, mpp_csv=mpp_csv, force=force,
            quiet=quiet, overrides=overrides)


def execute(inputs: list[Path], out: Path, config_file: Path | None, *, stages: str | None,
            mpp: float | None, mpp_csv: Path | None, force: bool = False, quiet: bool = False,
            overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Load and override the config, run the batch, print a summary, exit with its code."""
    from wsi_assist import batch, config
    from wsi_assist.progress import BatchProgress

    with user_errors():
        cfg = config.load(config_file)
        sections = {k: dict(v) for k, v in (overrides or {}).items()}
        sections.setdefault("mpp", {}).update(
            {"override": mpp, "csv": str(mpp_csv) if mpp_csv else None})
        cfg = config.override(cfg, **sections)
        if stages:
            cfg = config.from_dict({**cfg.to_dict(), "stages": stages}, "--stages")
        batch.check_writable(out)
        handler = _log_to_file(out / "run.log")
    if quiet:  # the console only; run.log keeps everything
        for h in logging.getLogger().handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)
    stop = _StopOnInterrupt()
    progress = BatchProgress(live=sys.stderr.isatty(), quiet=quiet)
    problems: list[str] = []
    try:
        with user_errors(), _client(cfg, out) as client:
            try:
                results = batch.run_batch(inputs, out, cfg, force=force, client=client,
                                          progress=progress, stop=stop)
            except batch.OutputsNotWritten as e:
                results = e.results
                problems += e.problems
    finally:
        progress.close()
        stop.restore()
        logging.getLogger().removeHandler(handler)
        handler.close()
    if handler.failures:
        reason = getattr(handler.last_error, "strerror", None) or "cannot write"
        problems.append(f"{out / 'run.log'}: {handler.failures} log messages not written "
                        f"({reason})")
    _summarise(results, out, stop.requested, problems)


def _summarise(results: list[Any], out: Path, interrupted: bool,
               problems: list[str] | None = None) -> None:
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    typer.echo(f"{done} done, {skipped} skipped, {len(failed)} failed -> {out}")
    for why, ids in _skipped_by_reason(results).items():
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        typer.echo(f"skipped ({why}): {shown}")
    for r in failed:
        typer.secho(f"failed [{r.stage}]: {r.error}", err=True, fg=typer.colors.RED)
    for r in results:
        for w in getattr(r, "warnings", []):
            typer.secho(f"warning [{r.slide_id}]: {w}", err=True, fg=typer.colors.YELLOW)
    for p in problems or []:
        typer.secho(f"error: {p}", err=True, fg=typer.colors.RED)
    if problems and not interrupted and results:
        raise typer.Exit(1)
    if interrupted:
        typer.secho("interrupted: finished slides are kept; run the same command again to "
                    "resume", err=True)
        raise typer.Exit(130)
    if not results:
        typer.secho("error: no slide files found", err=True)
        raise typer.Exit(2)
    raise typer.Exit(1 if failed else 0)


def _skipped_by_reason(results: list[Any]) -> dict[str, list[str]]:
    """Skipped slides' ids by why they were skipped (another run's pid shown once)."""
    out: dict[str, list[str]] = {}
    for r in results:
        if r.status == "skipped":
            out.setdefault(r.why_skipped, []).append(r.slide_id)
    return out


class _StopOnInterrupt:
    """First Ctrl-C: finish the current slide's atomic write, then stop. Second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. under a test runner)
            self._old = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after the current slide (press again to abort)")

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _log_to_file(path: Path) -> QuietFileHandler:
    """run.log, everything at DEBUG and above; records it cannot write (a full disk) are
    counted, not printed as "--- Logging error ---"."""
    from wsi_assist.errors import WsiAssistError

    try:
        h = QuietFileHandler(path)
    except OSError as e:
        raise WsiAssistError(f"{path}: cannot write the run log ({e.strerror})") from e
    h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: "
                                     "%(message)s"))
    h.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


def _quiet_dask() -> None:
    """Dask's own INFO lines (scheduler, nanny, connections: ~30 a run) at WARNING, in
    this process and its worker processes; one summary line is logged instead. With
    --debug they stay."""
    import dask
    import distributed  # noqa: F401  (configures its loggers on import: after that)

    if state.debug:
        return
    dask.config.set({"logging": {"distributed": "warning", "bokeh": "error",
                                 "tornado": "critical"}})
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]
    for name in ["distributed", *names]:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process while the block runs (processes started meanwhile
    keep ignoring it: the terminal's Ctrl-C reaches the whole process group, and the
    run, not its local Dask workers, decides what stops); the handler restored after."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _client:
    """A Dask client for ``--scheduler`` or ``--workers N`` (N > 1), else None."""

    def __init__(self, cfg: Any, out: Path) -> None:
        self.cfg = cfg.parallelism
        self.client: Client | None = None
        self.cluster: LocalCluster | None = None
        self.scratch = work_dir(out) / "dask"  # workers' spill folder: inside OUT

    def __enter__(self) -> Any:
        from wsi_assist.errors import WsiAssistError

        if self.cfg.scheduler:
            from dask.distributed import Client

            _quiet_dask()
            try:
                self.client = Client(self.cfg.scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise WsiAssistError(f"cannot reach the Dask scheduler at "
                                     f"{self.cfg.scheduler!r} ({e})") from e
            log.info("Dask: scheduler %s, %d workers", self.cfg.scheduler,
                     len(self.client.scheduler_info().get("workers", {})))
        elif self.cfg.workers > 1:
            import dask
            from dask.distributed import Client, LocalCluster

            _quiet_dask()
            dask.config.set({"temporary-directory": str(self.scratch)})
            from wsi_assist.batch import quiet_local_workers

            with _sigint_ignored():  # inherited by the worker processes spawned now
                self.cluster = LocalCluster(n_workers=self.cfg.workers, threads_per_worker=1,
                                            processes=True, host="127.0.0.1",
                                            dashboard_address=None,
                                            local_directory=str(self.scratch))
            self.client = Client(self.cluster)
            quiet_local_workers(self.client)  # and by those a nanny restarts later
            log.info("Dask: local cluster of %d worker processes at %s", self.cfg.workers,
                     self.cluster.scheduler_address)
        return self.client

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.scratch.parent.rmdir()
            remove_leftovers(self.scratch.parent.parent)  # the workers' own folders
