"""`wsi-assist report OUT/<slide-id>...`: rebuild annotations and reports from stored results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsi_assist.cli import options as opt
from wsi_assist.cli.common import user_errors


def report(
    slide_dirs: Annotated[list[Path], typer.Argument(help="Slide output folders "
                                                          "(OUT/<slide-id>), or OUT for "
                                                          "all of its slides.")],
    config: opt.ConfigFile = None,
    pdf: Annotated[bool | None, typer.Option("--pdf/--no-pdf", help="Render report.pdf "
                                                                    "(default: config).")]
    = None,
    tiles: Annotated[bool | None, typer.Option("--tiles/--no-tiles", help="Write tiles to "
                                                                          "annotations.geojson.")]
    = None,
) -> None:
    """Rebuild annotations.geojson and report.{json,md,html,pdf} without running any model.

    Uses the run's OUT/config.yaml unless --config is given; refreshes OUT/index.html
    and OUT/summary.csv when OUT/manifest.csv exists.
    """
    import contextlib
    import csv

    from wsi_assist import config as config_mod
    from wsi_assist import files
    from wsi_assist.batch import read_done, slide_folders
    from wsi_assist.report import browser
    from wsi_assist.report import pdf as report_pdf
    from wsi_assist.report.index import write_batch_outputs
    from wsi_assist.stages import rebuild_report

    configs: dict[Path, config_mod.Config] = {}
    done_in: dict[Path, None] = {}  # output folders with a rebuilt slide, in order
    with user_errors(), contextlib.ExitStack() as stack:
        folders = slide_folders(slide_dirs)
        if len(folders) > 1:  # one Chromium for every slide's PDF, its folder in OUT
            scratch = files.work_dir(folders[0].parent)
            stack.callback(_remove_empty, scratch)
            stack.enter_context(browser.shared(report_pdf.batch_browser(scratch)))
            if pdf is not False:
                browser.warm_current()  # starts while the first slide's outputs are built
        try:
            for d in folders:
                cfg = configs.get(d.parent)
                if cfg is None:
                    run_cfg = d.parent / "config.yaml"
                    cfg = config_mod.load(config or (run_cfg if run_cfg.is_file() else None))
                    cfg = config_mod.override(cfg, report={"pdf": pdf, "include_tiles": tiles})
                    configs[d.parent] = cfg
                done = read_done(d) or {}
                summary = rebuild_report(d, cfg, info=done.get("info"),
                                         seconds=done.get("seconds"),
                                         device=done.get("device"))
                typer.echo(f"{d}: {summary['annotations']} annotations, "
                           f"{summary['heatmaps']} heatmaps, pdf {summary['pdf']}")
                done_in[d.parent] = None
        finally:  # slides rebuilt before a failing one still get their index refreshed
            for out in done_in:
                manifest = out / "manifest.csv"
                if manifest.is_file():
                    with manifest.open(newline="", encoding="utf-8") as f:
                        write_batch_outputs(out, list(csv.DictReader(f)))


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` and its parent (``OUT/.work``) where they are left empty."""
    for d in (folder, folder.parent):
        try:
            d.rmdir()
        except OSError:
            return
