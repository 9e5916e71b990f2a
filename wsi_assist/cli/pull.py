"""`wsi-assist models pull NAME`: fetch a registered model into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from wsi_assist.cli.common import user_errors


def pull(
    name: Annotated[str | None, typer.Argument(help="A registered model (see --list).")]
    = None,
    list_models: Annotated[bool, typer.Option("--list", help="List the registered models "
                                                             "and exit.")] = False,
    cache_dir: Annotated[str | None, typer.Option(
        help="Cache folder (default: the standard Hugging Face cache, $HF_HUB_CACHE).")] = None,
    token: Annotated[str | None, typer.Option(
        help="Hub token for gated models (default: $HF_TOKEN or the stored login).")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
) -> None:
    """Download a model's files (or find them in the cache when HF_HUB_OFFLINE=1) and
    verify each against the hub's checksum. Exit 0 when all are there and match, 2 not."""
    from wsi_assist.models import pull as pull_mod
    from wsi_assist.models import registry

    if list_models or name is None:
        for m in registry.MODELS:
            flags = ", ".join(f for f, on in (("gated", m.gated),
                                               ("repo id unverified", not m.verified)) if on)
            typer.echo(f"{m.name:<18} {m.repo_id:<45} {m.kind}" + (f"  ({flags})"
                                                                   if flags else ""))
        raise typer.Exit(0 if list_models else 2)
    with user_errors():
        entry = registry.get(name)
        files = pull_mod.pull(entry, cache_dir=cache_dir, token=token, revision=revision)
    for f in files:
        typer.echo(f"{f.name:<40} {f.check:<10} {f.path}")
    target = files[0].path if len(files) == 1 else files[0].path.parent
    typer.secho(f"{entry.name} ({entry.repo_id}) is in the cache; use it with "
                f"{entry.use(str(target))}", fg=typer.colors.GREEN)
