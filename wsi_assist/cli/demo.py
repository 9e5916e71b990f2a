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
    results = out / "results"
    try:
        execute([path], results, None, stages=None, mpp=None, mpp_csv=None)
    except typer.Exit as e:  # execute ends with the run's exit code, after its summary
        _say_what_to_open(results, path.stem)
        raise e from None


def _say_what_to_open(results: Path, slide_id: str) -> None:
    """The files a new user opens next, when the run wrote them."""
    for label, p in (("report", results / slide_id / "report.html"),
                     ("report (PDF)", results / slide_id / "report.pdf"),
                     ("index of the batch", results / "index.html")):
        if p.is_file():
            typer.echo(f"open the {label}: {p.resolve()}")
