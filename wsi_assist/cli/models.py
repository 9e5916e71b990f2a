"""`wsi-assist models [show]`: which models are configured and whether they load;
`wsi-assist models convert SRC -o DST`: an original-layout LLaVA into a transformers one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_assist.cli import options as opt
from wsi_assist.cli.common import user_errors

PathclipOpt = Annotated[str | None, typer.Option(
    "--pathclip", help="pathclip-base.pt (else embed.pathclip, else $WSI_ASSIST_PATHCLIP).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Model spec: pathclip, ARCH:/path/ckpt.pt or hf-hub:org/repo.")]


app = typer.Typer(help="Show the configured models (the default: `models show`), or "
                       "convert a checkpoint (`models convert`).")


@app.command("convert")
def convert(
    src: Annotated[Path, typer.Argument(help="Original-layout LLaVA folder (haotian-liu/LLaVA: "
                                             "config.json with model_type llava_llama or "
                                             "llava_mistral, weights, tokenizer).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder to write the transformers "
                                                          "LlavaForConditionalGeneration to.")],
    vision_tower: Annotated[Path | None, typer.Option(
        "--vision-tower", help="Local CLIP vision tower folder (else mm_vision_tower of "
                               "config.json, which must then be a local folder).")] = None,
    template: Annotated[str | None, typer.Option(
        help="Conversation template: vicuna_v1 (llava_llama default) or mistral_instruct "
             "(llava_mistral default).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT.")] = False,
) -> None:
    """Convert an original LLaVA checkpoint (LLaVA-1.5 style: linear or mlp2x_gelu
    projector, CLIP tower) into a folder caption.model loads. Offline; exit 2 on errors."""
    from wsi_assist.models import llava_convert

    with user_errors():
        done = llava_convert.convert(src, out, vision_tower, template, force)
    typer.secho(f"converted {src} ({done.model_type}, {done.projector} projector, "
                f"{done.template} template, <image> = {done.image_token_index}, vocab "
                f"{done.vocab_size}) into {done.out}; set caption.model: {done.out}",
                fg=typer.colors.GREEN)


def models(
    ctx: typer.Context,
    config: opt.ConfigFile = None,
    pathclip: PathclipOpt = None,
    model: ModelOpt = None,
    load: Annotated[bool | None, typer.Option(
        "--load/--no-load", help="--load: load every model fully (reads all weights; slow "
                                 "for 7B captioners). --no-load: load none. Default: load "
                                 "the embedder and sub-models, check captioners cheaply "
                                 "(config, weight-file index, tokenizer).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Show every configured model (embedder, sub-models, captioner), the prompt sets,
    and whether each loads: one line each, with the reason when it does not. Captioners
    are checked without reading their weights unless --load.

    Exit 0 when every configured model loads, 1 when any does not.
    `wsi-assist models` without a subcommand is `models show`.
    """
    if ctx.invoked_subcommand is not None:
        return  # `models convert ...`: the subcommand runs instead
    from wsi_assist import config as config_mod
    from wsi_assist.cli.model_status import captioner_statuses, submodel_statuses
    from wsi_assist.models import pathclip as pc
    from wsi_assist.models.zeroshot import load_prompt_set, shipped_prompt_sets
    from wsi_assist.stages.context import resolve_device

    with user_errors():
        cfg = config_mod.override(config_mod.load(config),
                                  embed={"pathclip": pathclip, "model": model})
    params = cfg.embed
    typer.echo(f"embed.model     {params.model}")
    source = ("--pathclip" if pathclip else "embed.pathclip" if params.pathclip
              else pc.PATHCLIP_ENV if pc.pathclip_weights() else None)
    typer.echo(f"pathclip        {pc.pathclip_weights(params.pathclip) or '-'}"
               + (f"  (from {source})" if source else ""))
    typer.echo(f"engine          {params.engine}" + (f"  onnx={params.onnx}"
                                                     if params.engine == "onnx" else ""))
    with user_errors():
        ps = load_prompt_set(cfg.zeroshot.prompts)
    typer.echo(f"zeroshot        {ps.name}: {len(ps.classes)} classes, threshold "
               f"{cfg.zeroshot.threshold}; shipped: {', '.join(shipped_prompt_sets())}")
    with user_errors():
        dev = resolve_device(device)
    ok = _embedder(params, load is not False, dev)
    for st in [*submodel_statuses(cfg, dev, load is not False),
               *captioner_statuses(cfg, dev, load)]:
        typer.secho(st.line(), fg=None if st.ok else typer.colors.RED)
        ok = ok and st.ok
    raise typer.Exit(0 if ok else 1)


def _embedder(params: Any, load: bool, device: str) -> bool:
    """The embedder's lines; whether it loads (or is not configured)."""
    from wsi_assist.errors import WsiAssistError
    from wsi_assist.models import pathclip as pc

    try:
        spec = pc.configured_spec(params)
    except WsiAssistError as e:
        typer.secho(f"embedder        error: {e}", fg=typer.colors.RED)
        return False
    if spec is None:
        typer.echo("embedder        not configured: embed and zeroshot will not run "
                   f"(set embed.pathclip, --pathclip or {pc.PATHCLIP_ENV})")
        return True
    _describe_file(spec.weights)
    if not load:
        return True
    try:
        lm = pc.load_model(spec, device)
    except WsiAssistError as e:
        typer.secho(f"embedder        error: {e}", fg=typer.colors.RED)
        return False
    typer.secho(f"embedder        loads: {spec.describe()}, {lm.embed_dim}-d, "
                f"{lm.image_size} px, sha256 {lm.sha256[:16]} on {lm.device}",
                fg=typer.colors.GREEN)
    return True


def _describe_file(path: Path | None) -> None:
    if path is None:
        return
    size = f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "MISSING"
    typer.echo(f"weights file    {path} ({size})")


app.callback(invoke_without_command=True)(models)
app.command("show")(models)
