"""Commands import only what they use: the CLI, ``--help`` and ``info`` load no model or
cluster library (torch, dask, open_clip, transformers, onnxruntime); those are imported
inside the functions that run models or a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "dask", "distributed", "open_clip", "transformers", "onnxruntime",
         "timm", "h5py")

PROBE = """
import contextlib, io, json, sys
from wsi_assist.cli import main
sys.argv = ["wsi-assist", *sys.argv[1:]]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    if len(sys.argv) > 1:
        main()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def imported(*args: str) -> set[str]:
    """Top-level packages imported by a fresh interpreter running ``wsi-assist ARGS``
    (none: only importing ``wsi_assist.cli``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                       text=True, timeout=120, check=True, env=env)
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [(), ("--help",), ("run", "--help")])
def test_cli_import_and_help_load_no_heavy_library(args: tuple[str, ...]) -> None:
    assert not imported(*args) & set(HEAVY)


def test_info_loads_no_heavy_library(svs_slide: Path) -> None:
    mods = imported("info", str(svs_slide))
    assert "tiffslide" in mods  # it did read the slide
    assert not mods & set(HEAVY)
