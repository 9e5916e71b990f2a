"""The stage registry: what each stage declares is what it reads, and fingerprints follow
exactly what a stage reads for one slide."""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_assist import config
from wsi_assist.cli import app
from wsi_assist.errors import ConfigError
from wsi_assist.settings import SECTIONS
from wsi_assist.stages import REGISTRY, STAGE_NAMES, fingerprints
from wsi_assist.synthetic import default_slide, write_slide

runner = CliRunner()
#: Sections that say how a run is carried out, not what any stage computes.
RUN_SECTIONS = {"mpp", "stream", "parallelism"}


def test_stage_functions_take_exactly_their_declared_sections() -> None:
    for stage in REGISTRY.values():
        assert list(inspect.signature(stage.run).parameters)[1:] == list(stage.sections)
        assert all(STAGE_NAMES.index(d) < STAGE_NAMES.index(stage.name) for d in stage.needs)
        check = list(inspect.signature(stage.configured).parameters)
        assert check[1:] in (list(stage.sections), ["sections"]), stage.name


def test_every_section_is_read_by_a_stage_or_the_run() -> None:
    read = {s for stage in REGISTRY.values() for s in stage.sections}
    assert read | RUN_SECTIONS == set(SECTIONS)


def test_stage_names_come_from_the_registry() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'fly'; choose from " +
                       ", ".join(STAGE_NAMES)):
        config.from_dict({"stages": ["tissue", "fly"]})
    assert config.load().stages == STAGE_NAMES


def test_a_fingerprint_covers_what_its_stage_reads(tmp_path: Path) -> None:
    from wsi_assist.slide import describe

    slide = write_slide(tmp_path / "a.svs", default_slide(512, 512), kind="svs", mpp=0.5)
    info = describe(slide)
    base = fingerprints("fp", config.load(), info)
    report = fingerprints("fp", config.override(config.load(), report={"max_heatmaps": 1}),
                          info)
    assert [s for s in STAGE_NAMES if base[s] != report[s]] == ["report"]
    tiles = fingerprints("fp", config.override(config.load(), tiling={"tile_px": 256}), info)
    assert [s for s in STAGE_NAMES if base[s] != tiles[s]] == list(STAGE_NAMES[1:])
    batch_size = fingerprints("fp", config.override(config.load(), stream={"batch_size": 8}),
                              info)
    assert batch_size == base  # how tiles are read does not change results
    other_slide = fingerprints("fp2", config.load(), info)
    assert all(other_slide[s] != base[s] for s in STAGE_NAMES)


def _statuses(out: Path) -> dict[str, str]:
    with (out / "manifest.csv").open(newline="") as f:
        return {r["slide_id"]: r["status"] for r in csv.DictReader(f)}


def test_an_mpp_csv_row_reruns_that_slide_alone(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", default_slide(768, 512, seed=1), kind="tiff-no-mpp")
    for name in ("b", "c"):
        write_slide(slides / f"{name}.svs", default_slide(768, 512, seed=2), kind="svs",
                    mpp=0.5)
    out = tmp_path / "out"
    table = tmp_path / "mpp.csv"

    def run(rows: str) -> dict[str, str]:
        table.write_text("slide,mpp\n" + rows)
        r = runner.invoke(app, ["tile", str(slides), "-o", str(out), "--mpp-csv", str(table)])
        assert r.exit_code == 0, r.output
        return _statuses(out)

    assert run("a.tif,0.5\n") == {"a": "done", "b": "done", "c": "done"}
    assert run("a.tif,0.5\n") == {"a": "skipped", "b": "skipped", "c": "skipped"}
    # a new resolution for slide a: a alone is redone
    assert run("a.tif,0.25\n") == {"a": "done", "b": "skipped", "c": "skipped"}
    # a row for b, whose file has its own mpp (which wins): nothing changes for anyone
    assert run("a.tif,0.25\nb.svs,0.3\n") == {"a": "skipped", "b": "skipped", "c": "skipped"}
