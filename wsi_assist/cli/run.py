"""`wsi-assist run INPUT... -o OUT`: the configured stages over every slide found."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_assist.cli import options as opt
from wsi_assist.cli.common import user_errors


def run(
    inputs: opt.Inputs,
    out: opt.Out,
    config: opt.ConfigFile = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated stages: tissue, tiles, "
                                                    "embed, zeroshot, submodels, caption, "
                                                    "report.")] = None,
    mpp: opt.Mpp = None,
    mpp_csv: opt.MppCsv = None,
    providers: Annotated[str | None, typer.Option(
        help="onnxruntime providers for sub-models, in order: comma-separated from "
             "tensorrt, cuda, cpu (default: those available).")] = None,
) -> None:
    """Process slides into OUT. Exit 0 when all slides are done, 1 when any failed."""
    overrides = ({"submodels": {"providers": [p.strip() for p in providers.split(",")
                                              if p.strip()]}} if providers else None)
    execute(inputs, out, config, stages=stages, mpp=mpp, mpp_csv=mpp_csv, overrides=overrides)


def execute(inputs: list[Path], out: Path, config_file: Path | None, *, stages: str | None,
            mpp: float | None, mpp_csv: Path | None,
            overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Load and override the config, run the batch, print a summary, exit with its code."""
    from wsi_assist import batch, config

    with user_errors():
        cfg = config.load(config_file)
        sections = {k: dict(v) for k, v in (overrides or {}).items()}
        sections.setdefault("mpp", {}).update(
            {"override": mpp, "csv": str(mpp_csv) if mpp_csv else None})
        cfg = cfg.with_overrides(**sections)
        if stages:
            d = cfg.to_dict()
            d["stages"] = stages
            cfg = config.from_dict(d, "--stages")
        results = batch.run_batch(inputs, out, cfg)
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    typer.echo(f"{done} done, {skipped} skipped, {len(failed)} failed -> {out}")
    for r in failed:
        typer.secho(f"failed: {r.error}", err=True, fg=typer.colors.RED)
    if not results:
        typer.secho("error: no slide files found", err=True)
        raise typer.Exit(2)
    raise typer.Exit(1 if failed else 0)
