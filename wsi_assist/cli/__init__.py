"""The command line: parse, then call the library. One module per command."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from wsi_assist.cli import demo, info, models, pull, report, run, tile
from wsi_assist.cli import eval as eval_cmd
from wsi_assist.cli.common import state

app = typer.Typer(name="wsi-assist", no_args_is_help=True, add_completion=False,
                  help="Batch-process whole-slide images: tissue, tiles, embeddings, "
                       "findings, QuPath annotations and draft reports.")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
    = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")]
    = False,
) -> None:
    if version:
        from wsi_assist import __version__

        typer.echo(f"wsi-assist {__version__}")
        raise typer.Exit(0)
    state.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    if not debug:
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: not r.name.startswith("wsi_assist.traceback"))
    for noisy in ("PIL", "distributed", "asyncio", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # tifffile logs every malformed tag of a bad file; our one-line error says enough
    logging.getLogger("tifffile").setLevel(logging.DEBUG if debug else logging.CRITICAL)


app.command("info")(info.info)
app.command("run")(run.run)
app.command("tile")(tile.tile)
app.command("demo")(demo.demo)
models.app.command("pull")(pull.pull)
app.add_typer(models.app, name="models")
app.add_typer(eval_cmd.app, name="eval")
app.command("report")(report.report)


def main() -> None:
    app()
