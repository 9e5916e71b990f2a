"""What a stage sees of one slide: the file, its description, its store, and how tiles
are read. Built by the batch for each slide; stages know nothing of the CLI or Dask."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_assist.settings import StreamParams
from wsi_assist.slide import SlideInfo, open_slide
from wsi_assist.store import SlideStore
from wsi_assist.stream import TileBatch, stream
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideContext:
    """One slide being processed: ``store`` is its (work) folder's store."""

    path: Path
    slide_id: str
    info: SlideInfo
    store: SlideStore
    device: str = "cpu"
    stream_params: StreamParams = StreamParams()
    #: The batch output folder (OUT); None when the slide is run outside a batch.
    out_root: Path | None = None
    #: Hash of the whole effective config, for the report's provenance.
    config_hash: str = ""
    #: Per stage, done or not run and why: the registry's ``stage_table``, given here
    #: so that the report stage needs no import of the registry that lists it.
    stage_status: Callable[[SlideStore], dict[str, dict[str, str]]] = lambda store: {}

    @property
    def out_dir(self) -> Path:
        return self.store.folder

    def open_slide(self) -> Any:
        """The slide file opened with tiffslide (a context manager)."""
        return open_slide(self.path)

    def stream(self, grid: TileGrid, batch_size: int | None = None) -> Iterator[TileBatch]:
        """The slide's tiles of ``grid`` with the ``stream`` settings; ``batch_size``
        overrides ``stream.batch_size``."""
        sp = self.stream_params
        return stream(self.path, grid, batch_size=batch_size or sp.batch_size,
                      prefetch=sp.prefetch, threads=sp.threads)


#: Whether this process has said that ``auto`` fell back to the CPU (said once).
_FELL_BACK: list[str] = []


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (with one warning line
    per process saying why); other specs unchanged."""
    if spec != "auto":
        return spec
    try:
        import torch
    except ImportError:
        return _fall_back("torch is not installed")
    if torch.cuda.is_available():
        return "cuda"
    return _fall_back("no CUDA device found")


def _fall_back(why: str) -> str:
    if not _FELL_BACK:
        _FELL_BACK.append(why)
        log.warning("--device auto: %s; running on the CPU", why)
    return "cpu"


def check_device(spec: str) -> None:
    """A WsiAssistError when ``spec`` asks for a CUDA device this machine does not have."""
    if not spec.startswith("cuda"):
        return
    from wsi_assist.errors import ConfigError

    try:
        import torch
    except ImportError as e:
        raise ConfigError(f"--device {spec}: torch is not installed") from e
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(f"--device {spec}: this machine has {have}; use --device cpu, "
                          "auto, or an existing cuda:N")
