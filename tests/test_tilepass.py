"""The slide's one tile pass (stages/tilepass.py): the stages that read tiles give the
same results from one pass as each from a pass of its own, each compressed chunk is
decoded once, consumers get their own rows and batch sizes, resume feeds only the
stages still to run, and a consumer's error names its stage without hanging the pass."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import _subnets
import numpy as np
import pytest
from stage_helper import run_stage, slide_context
from tinyclip import TINY_ARCH, register_tiny, save_tiny

from exporters.submodels import export_model, spec_dict
from wsi_assist import chunks, config, lowres
from wsi_assist.stages import REGISTRY, run_stages, tilepass
from wsi_assist.stream import stream
from wsi_assist.synthetic import default_slide, write_slide

os.environ["HF_HUB_OFFLINE"] = "1"
TILE_STAGES = ("tiles", "embed", "submodels")
STAGES = ("tissue", *TILE_STAGES)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slide(tmp_path_factory.mktemp("tp") / "s.svs", default_slide(1024, 768,
                       seed=5), mpp=0.5, quality=90)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tpm")
    register_tiny(d)
    export_model(_subnets.classifier(3).eval(), d, spec_dict(
        "cls", "tile-classification", ["a", "b", "c"], 64, 0.5, mean=(0, 0, 0),
        std=(1, 1, 1)), atol=1e-4)
    return {"clip": f"{TINY_ARCH}:{save_tiny(d / 'tiny.pt', seed=1)}",
            "cls": str(d / "cls.yaml")}


def _cfg(models: dict[str, str], **tiling: object) -> config.Config:
    return config.override(
        config.load(), tiling={"tile_px": 64, **tiling}, parallelism={"device": "cpu"},
        stream={"batch_size": 16}, embed={"model": models["clip"], "batch_size": 7},
        submodels={"specs": ["nuclei", models["cls"]]})


def _results(store) -> dict[str, np.ndarray]:
    out = {f"qc/{k}": v for k, v in store.read_qc().items()}
    out["emb"] = store.read_embeddings().vectors
    for name in ("nuclei", "cls"):
        rec = store.read_submodel(name)
        out |= {f"{name}/{k}": np.asarray(a[:]) for k, a in rec.arrays.items()}
    return out


@pytest.mark.parametrize("tiling", [
    {"target_mpp": 0.5},  # tiles as stored: cut out of the nuclei's blocks
    {"target_mpp": 1.0},  # resized 2:1: cut out of the resized blocks
    {"target_mpp": 1.2},  # resized 2.4:1: blocks at level scale, resized in the pass
], ids=["native", "half", "odd-ratio"])
def test_one_pass_equals_separate_passes(slide: Path, models: dict[str, str], tmp_path: Path,
                                         tiling: dict[str, float]) -> None:
    cfg = _cfg(models, **tiling)
    one = slide_context(slide, tmp_path / "one", cfg)
    summary, _ = run_stages(one, cfg, STAGES)
    assert all("skipped" not in summary[s] for s in TILE_STAGES), summary
    apart = slide_context(slide, tmp_path / "apart", cfg)
    for name in STAGES:  # each stage's own pass
        run_stage(apart, cfg, name)
    a, b = _results(one.store), _results(apart.store)
    assert a.keys() == b.keys() and len(a["nuclei/points"]) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Decodes per unit of the tile stream, at full scale or DCT-scaled (each source's
    own ``decode``); the overview and thumbnail reads (``lowres``) are not counted."""
    seen: Counter = Counter()
    lowres_sources: list[Any] = []  # kept alive: their ids are not reused
    real_open = lowres.open_units

    def open_units(*args: Any) -> Any:
        lowres_sources.append(real_open(*args))
        return lowres_sources[-1]

    monkeypatch.setattr(lowres, "open_units", open_units)
    for cls in (chunks.TiffUnits, chunks.ScaledUnits):
        monkeypatch.setattr(cls, "decode",  # type: ignore[misc]
                            _counting(cls.decode, seen, lowres_sources))
    return seen


def _counting(decode: Any, seen: Counter, skip: list[Any]) -> Any:
    def counted(self: Any, uy: int, ux: int) -> np.ndarray:
        if not any(self is src for src in skip):
            seen[(id(self), uy, ux)] += 1
        return decode(self, uy, ux)
    return counted


def test_each_chunk_is_decoded_once_for_all_stages(slide: Path, models: dict[str, str],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(models, target_mpp=1.0)
    ctx = slide_context(slide, tmp_path / "s", cfg)
    run_stages(ctx, cfg, ("tissue",))
    seen = _count_decodes(monkeypatch)
    run_stages(ctx, cfg, TILE_STAGES)
    assert seen and max(seen.values()) == 1
    once = sum(seen.values())
    seen.clear()
    for name in TILE_STAGES:
        run_stage(ctx, cfg, name)
    assert sum(seen.values()) > 2 * once  # three streams of their own


def test_resume_feeds_only_the_stages_to_run(slide: Path, models: dict[str, str],
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(models)
    ctx = slide_context(slide, tmp_path / "s", cfg)
    run_stages(ctx, cfg, ("tissue", "tiles"))
    fed: list[list[str]] = []
    real = tilepass.run_pass

    def spy(slide_ctx, consumers):  # type: ignore[no-untyped-def]
        fed.append([c.name for c in consumers])
        return real(slide_ctx, consumers)

    monkeypatch.setattr(tilepass, "run_pass", spy)
    summary, seconds = run_stages(ctx, cfg, ("embed",))
    assert fed == [["embed"]] and summary["embed"]["n_tiles"] > 0 and seconds["embed"] > 0


def test_consumers_get_their_rows_and_batch_sizes(slide: Path, models: dict[str, str],
                                                  tmp_path: Path) -> None:
    cfg = _cfg(models)
    ctx = slide_context(slide, tmp_path / "s", cfg)
    run_stages(ctx, cfg, ("tissue", "tiles"))
    grid = ctx.store.read_grid()
    rows = np.arange(1, len(grid), 3)

    def collect(batches):  # type: ignore[no-untyped-def]
        return [(b.index.copy(), b.tiles.copy()) for b in batches]

    subset = tilepass.Consumer("x", "subset", collect, grid, 5, rows=rows)
    whole = tilepass.Consumer("x", "whole", collect, grid, 16)
    tilepass.run_pass(ctx, [subset, whole])
    part = type(grid)(**{**grid.__dict__, "coords": grid.coords[rows],
                         "tissue_fraction": grid.tissue_fraction[rows]})
    for c, g, bs in ((subset, part, 5), (whole, grid, 16)):
        ref = [(b.index, b.tiles) for b in stream(slide, g, batch_size=bs)]
        assert len(c.result) == len(ref)
        for (i, t), (ri, rt) in zip(c.result, ref, strict=True):
            np.testing.assert_array_equal(i, ri)
            np.testing.assert_array_equal(t, rt)


def test_a_failing_consumer_names_its_stage(slide: Path, models: dict[str, str],
                                            tmp_path: Path) -> None:
    cfg = _cfg(models)
    ctx = slide_context(slide, tmp_path / "s", cfg)
    run_stages(ctx, cfg, ("tissue", "tiles"))
    grid = ctx.store.read_grid()

    def boom(batches):  # type: ignore[no-untyped-def]
        next(iter(batches))
        raise RuntimeError("model broke")

    slow = tilepass.Consumer("tiles", "slow", lambda b: sum(1 for _ in b), grid, 1)
    with pytest.raises(RuntimeError, match="model broke") as e:
        tilepass.run_pass(ctx, [slow, tilepass.Consumer("embed", "boom", boom, grid, 2)])
    assert e.value.stage == "embed"  # type: ignore[attr-defined]


def test_tile_stages_declare_a_pass() -> None:
    assert {n for n, s in REGISTRY.items() if s.open_pass is not None} == set(TILE_STAGES)
