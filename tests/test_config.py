"""The config file: defaults match the code, every key is commented, errors name key paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_assist import config
from wsi_assist.errors import ConfigError
from wsi_assist.settings import SECTIONS, Config


def test_default_yaml_matches_code_defaults() -> None:
    loaded = config.load()
    assert loaded.to_dict() == Config(stages=loaded.stages).to_dict()
    assert set(yaml.safe_load(config.default_config_path().read_text())) == \
        {"stages", *SECTIONS}


def test_every_key_has_a_comment() -> None:
    lines = config.default_config_path().read_text().splitlines()
    block_indent = None  # inside a `key: |` block scalar, deeper lines are its text
    for i, line in enumerate(lines):
        s = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not s or indent > block_indent):
            continue
        block_indent = indent if s.endswith(("|", "|-", ">", ">-")) else None
        if not s or s.startswith("#") or s.endswith(":"):
            continue  # comments, blank lines and section headers
        assert lines[i - 1].strip().startswith("#"), f"no comment above {s!r}"


@pytest.mark.parametrize("text, message", [
    ("tiling:\n  tile_px: 4\n", "tiling.tile_px: tile_px must be >= 8"),
    ("tiling:\n  tile_pz: 4\n", "tiling.tile_pz: unknown key; valid keys: target_mpp"),
    ("tissue:\n  background: blue\n", "tissue.background: must be one of auto, bright, dark"),
    ("tiling:\n  target_mpp: fast\n", "tiling.target_mpp: must be float"),
    ("stages: [tissue, fly]\n", "unknown stage 'fly'; choose from tissue, tiles"),
    ("colour: red\n", "unknown key 'colour'"),
    ("tiling: [1, 2]\n", "tiling: must be a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_errors_name_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
        config.load(p)
    assert str(p) in str(e.value)


def test_user_file_and_overrides_merge(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  tile_px: 256\n")
    c = config.load(p)
    assert c.tiling.tile_px == 256 and c.tiling.target_mpp == 0.5
    c2 = config.override(c, tiling={"target_mpp": 0.25, "min_tissue": None})
    assert (c2.tiling.tile_px, c2.tiling.target_mpp, c2.tiling.min_tissue) == (256, 0.25, 0.25)
    assert c.section_hash("tiling") != c2.section_hash("tiling")
    assert c.section_hash("tissue") == c2.section_hash("tissue")
