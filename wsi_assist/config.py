"""Configuration: ``configs/default.yaml`` merged with a user file and command-line flags.

Each section is a frozen dataclass owned by the module that uses it; this module only
maps section names to those classes, checks keys and types, and names the key path in
every error (``tiling.tile_px: must be >= 8, got 4``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsi_assist.caption import CaptionParams
from wsi_assist.errors import ConfigError
from wsi_assist.models.pathclip import EmbedParams
from wsi_assist.models.submodels import SubmodelParams
from wsi_assist.models.zeroshot import ZeroShotParams
from wsi_assist.report.params import ReportParams
from wsi_assist.tiling import TilingParams
from wsi_assist.tissue import TissueParams

#: Stages in pipeline order.
STAGES = ("tissue", "tiles", "embed", "zeroshot", "submodels", "caption", "report")


@dataclass(frozen=True)
class MppParams:
    """Resolution overrides for slides that carry none (config section ``mpp``)."""

    override: float | None = None
    csv: str | None = None

    def __post_init__(self) -> None:
        if self.override is not None and not self.override > 0:
            raise ValueError(f"override must be > 0, got {self.override!r}")


@dataclass(frozen=True)
class StreamParams:
    """How tiles are read (config section ``stream``)."""

    batch_size: int = 64
    prefetch: int = 4
    threads: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = all cores), got {self.threads!r}")


@dataclass(frozen=True)
class OutputParams:
    """What is written besides the zarr store (config section ``outputs``)."""

    thumbnail_px: int = 1024
    draw_tiles: bool = True

    def __post_init__(self) -> None:
        if self.thumbnail_px < 64:
            raise ValueError(f"thumbnail_px must be >= 64, got {self.thumbnail_px!r}")


@dataclass(frozen=True)
class ParallelParams:
    """Where slides run (config section ``parallelism``)."""

    workers: int = 1
    scheduler: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:")
                                                   and dev[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")


#: Section name -> dataclass. Later stages register theirs here.
SECTIONS: dict[str, type] = {
    "mpp": MppParams,
    "tissue": TissueParams,
    "tiling": TilingParams,
    "stream": StreamParams,
    "outputs": OutputParams,
    "parallelism": ParallelParams,
    "caption": CaptionParams,
    "embed": EmbedParams,
    "zeroshot": ZeroShotParams,
    "report": ReportParams,
    "submodels": SubmodelParams,
}


@dataclass(frozen=True)
class Config:
    """The effective configuration: stages to run plus one object per section."""

    stages: tuple[str, ...] = STAGES
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage {bad[0]!r}; choose from "
                              f"{', '.join(STAGES)}")
        for name, cls in SECTIONS.items():
            self.sections.setdefault(name, cls())

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": list(self.stages)}
        for name, obj in self.sections.items():
            out[name] = dataclasses.asdict(obj)
        return out

    def section_hash(self, *names: str) -> str:
        """A short hash of some sections, for deciding which stages must rerun."""
        d = self.to_dict()
        blob = json.dumps({n: d.get(n) for n in names}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys replaced, e.g. ``tiling={"tile_px": 256}``."""
        d = self.to_dict()
        for name, values in sections.items():
            d.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
        return from_dict(d, "command line")


def default_config_path() -> Path:
    """``configs/default.yaml`` of a source checkout, or the copy packaged in the wheel."""
    here = Path(__file__).resolve().parent
    for p in (here / "configs" / "default.yaml", here.parent / "configs" / "default.yaml"):
        if p.is_file():
            return p
    raise ConfigError("configs/default.yaml not found next to the wsi_assist package")


def load(path: Path | None = None) -> Config:
    """The defaults, with the YAML file at ``path`` (if any) merged over them."""
    merged = _read_yaml(default_config_path())
    if path is not None:
        user = _read_yaml(path)
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return from_dict(merged, str(path or default_config_path()))


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict into a Config; errors name ``source`` and the key path."""
    unknown = set(data) - set(SECTIONS) - {"stages"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys: stages, "
                          f"{', '.join(SECTIONS)}")
    stages = data.get("stages", list(STAGES))
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    if not isinstance(stages, list | tuple):
        raise ConfigError(f"{source}: stages: must be a list of stage names")
    sections = {name: _build(cls, data.get(name) or {}, name, source)
                for name, cls in SECTIONS.items()}
    try:
        return Config(stages=tuple(stages), sections=sections)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def save(config: Config, path: Path) -> None:
    """Write the effective config as YAML."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The raw data of a YAML file; ``error`` (naming the file and ``what`` it should be)
    when it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data


def _build(cls: type, data: Any, section: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {section}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: {section}.{key}: unknown key; valid keys: "
                              f"{', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{section}.{k}", source) for k, v in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        msg = str(e)
        key = msg.split(" ", 1)[0]
        path = f"{section}.{key}" if key in fields else section
        raise ConfigError(f"{source}: {path}: {msg}") from None


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {path}: must be one of "
                              f"{', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {path}: must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (
            hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{source}: {path}: must be {name}, got {value!r}")
