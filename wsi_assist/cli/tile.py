"""`wsi-assist tile INPUT... -o OUT`: tissue and the tile grid only (run --stages tissue,tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_assist.cli import options as opt


def tile(
    inputs: opt.Inputs,
    out: opt.Out,
    config: opt.ConfigFile = None,
    mpp: opt.Mpp = None,
    mpp_csv: opt.MppCsv = None,
    tile_px: Annotated[int | None, typer.Option(help="Tile side at the target mpp, px.")]
    = None,
    target_mpp: Annotated[float | None, typer.Option(help="Resolution of tiles, um/px.")]
    = None,
    min_tissue: Annotated[float | None, typer.Option(help="Minimum tissue fraction of a "
                                                          "kept tile.")] = None,
    background: Annotated[str | None, typer.Option(help="auto, bright or dark.")] = None,
) -> None:
    """Detect tissue and lay the tile grid; writes thumbnail.png, tissue.geojson, slide.zarr."""
    from wsi_assist.cli.run import execute

    overrides: dict[str, dict[str, Any]] = {
        "tiling": {"tile_px": tile_px, "target_mpp": target_mpp, "min_tissue": min_tissue},
        "tissue": {"background": background}}
    execute(inputs, out, config, stages="tissue,tiles", mpp=mpp, mpp_csv=mpp_csv,
            overrides=overrides)


__all__ = ["Path", "tile"]
