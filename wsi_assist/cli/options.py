"""Options shared by several commands, as ``Annotated`` types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Inputs = Annotated[list[Path], typer.Argument(help="Slide files or folders (recursive).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config merged over "
                                                                  "configs/default.yaml.")]
Mpp = Annotated[float | None, typer.Option("--mpp", help="um/px for slides whose files carry "
                                                         "no usable resolution.")]
MppCsv = Annotated[Path | None, typer.Option("--mpp-csv", help="CSV with columns slide,mpp: "
                                                               "per-slide overrides.")]
