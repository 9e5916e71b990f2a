"""`wsi-assist report OUT/<slide-id>...`: rebuild annotations and reports from stored results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsi_assist.cli import options as opt
from wsi_assist.cli.common import user_errors


def report(
    slide_dirs: Annotated[list[Path], typer.Argument(help="Slide output folders "
                                                          "(OUT/<slide-id>).")],
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
    import csv
    import json

    from wsi_assist import config as config_mod
    from wsi_assist import store
    from wsi_assist.errors import WsiAssistError
    from wsi_assist.report.build import build_slide_outputs
    from wsi_assist.report.index import write_batch_outputs

    with user_errors():
        for d in slide_dirs:
            if not (d / "slide.zarr").is_dir():
                raise WsiAssistError(f"{d}: no slide.zarr here; give a slide output folder "
                                     "OUT/<slide-id>")
            run_cfg = d.parent / "config.yaml"
            cfg = config_mod.load(config or (run_cfg if run_cfg.is_file() else None))
            cfg = cfg.with_overrides(report={"pdf": pdf, "include_tiles": tiles})
            done = _read(d / "done.json", json)
            group = store.open_store(d / "slide.zarr", mode="r")
            summary = build_slide_outputs(d, group, cfg, slide_id=d.name,
                                          info=done.get("info"), seconds=done.get("seconds"))
            typer.echo(f"{d}: {summary['annotations']} annotations, "
                       f"{summary['heatmaps']} heatmaps, pdf {summary['pdf']}")
            manifest = d.parent / "manifest.csv"
            if manifest.is_file():
                with manifest.open(newline="", encoding="utf-8") as f:
                    write_batch_outputs(d.parent, list(csv.DictReader(f)))


def _read(path: Path, json_mod) -> dict:  # type: ignore[no-untyped-def,type-arg]
    if not path.is_file():
        return {}
    try:
        data = json_mod.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
