"""`wsi-assist demo [-o DIR]`: write a synthetic slide and run the main job on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo slide and "
                                                          "its results.")]
    = Path("wsi-assist-demo"),
) -> None:
    """Make a small synthetic H&E-like slide (labelled synthetic) and process it."""
    from wsi_assist.cli.run import execute
    from wsi_assist.synthetic import default_slide, write_slide

    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    path = slides / "synthetic-demo.svs"
    if not path.exists():
        write_slide(path, default_slide(3072, 2304), kind="svs", mpp=0.5)
    typer.echo(f"synthetic slide (not a real specimen): {path}")
    execute([path], out / "results", None, stages=None, mpp=None, mpp_csv=None)
