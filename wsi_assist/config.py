"""Configuration files: ``configs/default.yaml`` merged with a user file and command-line
flags, validated into a :class:`~wsi_assist.settings.Config`.

This module only loads, merges and reports errors; the sections themselves are in
:mod:`wsi_assist.settings`. Every error is a ConfigError naming the source and the key
path, e.g. ``my.yaml: tiling.tile_px: tile_px must be >= 8, got 4``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from wsi_assist import files
from wsi_assist.errors import ConfigError
from wsi_assist.settings import SECTIONS, Config, describe_error

__all__ = ["SECTIONS", "Config", "default_config_path", "from_dict", "load", "override",
           "save"]


def default_config_path() -> Path:
    """``configs/default.yaml`` of a source checkout, or the copy packaged in the wheel."""
    try:
        return files.configs_dir() / "default.yaml"
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def load(path: Path | None = None) -> Config:
    """The defaults, with the YAML file at ``path`` (if any) merged over them."""
    merged = _read(default_config_path())
    if path is not None:
        for key, value in _read(path).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return from_dict(merged, str(path or default_config_path()))


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate plain data into a Config; errors name ``source`` and the key path."""
    from wsi_assist.stages import STAGE_NAMES, check_stage_names

    data = {k: v for k, v in data.items() if v is not None}  # an empty YAML section
    data.setdefault("stages", list(STAGE_NAMES))
    if isinstance(data.get("stages"), str):  # --stages a,b,c
        data["stages"] = [s.strip() for s in data["stages"].split(",") if s.strip()]
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_error(Config, e.errors()[0])}") from None
    try:
        check_stage_names(cfg.stages)
    except ValueError as e:
        raise ConfigError(f"{source}: stages: {e}") from None
    return cfg


def override(config: Config, /, **sections: dict[str, Any]) -> Config:
    """A copy with some keys replaced (command-line flags), e.g. ``tiling={"tile_px":
    256}``; None values leave a key as it is."""
    d = config.to_dict()
    for name, values in sections.items():
        d.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
    return from_dict(d, "command line")


def save(config: Config, path: Path) -> None:
    """Write the effective config as YAML."""
    files.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _read(path: Path) -> dict[str, Any]:
    data = files.read_yaml(path, "config", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data
