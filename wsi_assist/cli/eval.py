"""`wsi-assist eval zeroshot DIR --prompts SET --model SPEC`: zero-shot metrics on a
benchmark in its released layout (the prompt set's `dataset.layout`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_assist.cli.common import user_errors
from wsi_assist.cli.models import ModelOpt, PathclipOpt

app = typer.Typer(no_args_is_help=True, help="Evaluate models on labelled data.")


@app.command("zeroshot")
def zeroshot(
    folder: Annotated[Path, typer.Argument(help="The benchmark as released: class folders "
                                                "(crc100k, lc25000_*, bach), the PCam .h5 "
                                                "folder, WSSS4LUAD, SICAPv2, SkinCancer or "
                                                "Osteo root (see the prompt set's layout).")],
    prompts: Annotated[str, typer.Option(help="Prompt set: a shipped name (crc100k, pcam, "
                                              "sicapv2, ...) or a YAML file.")],
    model: ModelOpt = None,
    pathclip: PathclipOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per batch.")] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics "
                                                                 "as JSON here.")] = None,
) -> None:
    """Accuracy, balanced accuracy, weighted F1 and the confusion matrix."""
    from wsi_assist.models.evaluate import evaluate
    from wsi_assist.models.pathclip import parse_spec
    from wsi_assist.models.zeroshot import load_prompt_set
    from wsi_assist.stages.context import resolve_device

    with user_errors():
        ps = load_prompt_set(prompts)
        spec = parse_spec(model or "pathclip", pathclip)
        result = evaluate(folder, ps, spec, device=resolve_device(device),
                          batch_size=batch_size)
    _print(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        typer.echo(f"metrics written to {json_out}")


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(width=None if Console().is_terminal else 160)
    out.print(f"{r['model']} on {r['root']} ({r['n']} patches), prompt set {r['prompt_set']}"
              + (f" ({r['prompt_source']})" if r.get("prompt_source") else ""))
    out.print(f"accuracy {r['accuracy']:.4f}  balanced accuracy "
              f"{r['balanced_accuracy']:.4f}  weighted F1 {r['weighted_f1']:.4f}")
    t = Table(title="confusion matrix (rows: true, columns: predicted)")
    t.add_column("true \\ pred")
    for name in r["classes"]:
        t.add_column(name, justify="right")
    t.add_column("recall", justify="right")
    for name, row, rec in zip(r["classes"], r["confusion"], r["per_class"]["recall"],
                              strict=True):
        t.add_row(name, *map(str, row), f"{rec:.3f}")
    out.print(t)
