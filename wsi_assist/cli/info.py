"""`wsi-assist info PATH... [--json]`: what each slide is, or why it cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_assist.cli.common import state, user_errors


def info(
    paths: Annotated[list[Path], typer.Argument(help="Slide files or folders (searched "
                                                     "recursively).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array, one object "
                                                         "per file.")] = False,
    mpp: Annotated[float | None, typer.Option(help="um/px for slides that carry none.")]
    = None,
    mpp_csv: Annotated[Path | None, typer.Option(help="CSV (slide,mpp) of per-slide "
                                                      "overrides.")] = None,
) -> None:
    """Describe slides: format, vendor, size, levels, mpp and where the mpp came from,
    and the channels (RGB, or the names of a multichannel image's channels).

    Exit 0 when every file is readable, 2 when any is not.
    """
    from wsi_assist.errors import SlideError
    from wsi_assist.slide import describe, find_slides, mpp_for, read_mpp_csv

    if mpp is not None and not mpp > 0:
        typer.secho(f"error: --mpp must be a positive number of um per pixel, got {mpp:g}",
                    err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    with user_errors():
        table = read_mpp_csv(mpp_csv) if mpp_csv else None
    files = find_slides(paths)
    if table and mpp_csv:
        from wsi_assist.batch import warn_unmatched

        warn_unmatched(mpp_csv, table, files)
    if not files:
        typer.secho("error: no slide files found in " + ", ".join(map(str, paths)), err=True)
        raise typer.Exit(2)
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            d = describe(f, mpp_override=mpp_for(f, mpp, table)).to_json()
            d.update(ok=True, error=None)
        except SlideError as e:
            if state.debug:
                raise
            d = {"path": str(f), "ok": False, "error": str(e)}
        rows.append(d)
    if as_json:
        keys = ["path", "ok", "error", "format", "vendor", "width", "height", "level_count",
                "level_downsamples", "mpp", "mpp_source", "objective_power", "layout",
                "dtype", "channels"]
        typer.echo(json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=2))
    else:
        _print_table(rows)
    raise typer.Exit(0 if all(r["ok"] for r in rows) else 2)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(width=None if Console().is_terminal else 140)
    t = Table("file", "format", "size (px)", "levels", "mpp", "mpp source", "objective",
              "channels")
    t.columns[0].overflow = t.columns[-1].overflow = "fold"
    for r in rows:
        if not r["ok"]:
            continue
        mpp = f"{r['mpp']:.4g}" if r["mpp"] else "-"
        t.add_row(Path(r["path"]).name, r["format"], f"{r['width']} x {r['height']}",
                  " ".join(f"{d:g}" for d in r["level_downsamples"]), mpp,
                  r["mpp_source"] or "unknown",
                  f"{r['objective_power']:g}x" if r["objective_power"] else "-",
                  _channels(r))
    if t.row_count:
        out.print(t)
    err = Console(stderr=True, soft_wrap=True)
    for r in rows:
        if not r["ok"]:
            err.print(f"[red]error:[/red] {r['error']}", markup=True, highlight=False)


def _channels(row: dict[str, Any]) -> str:
    """``RGB``, or ``N x dtype: name, name, ...`` for a multichannel slide."""
    if row.get("layout") != "channels":
        return "RGB"
    names = row.get("channels") or []
    return f"{len(names)} x {row.get('dtype')}: " + ", ".join(str(n) for n in names)
