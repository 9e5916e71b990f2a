"""Caption stage: a tiny LLaVA built here and loaded through the real code path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import random_vlm

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from wsi_assist import config as config_mod
from wsi_assist import pipeline, represent, store
from wsi_assist.caption import CaptionParams, tile_findings
from wsi_assist.errors import ModelError
from wsi_assist.models.captioner import build_prompt, findings_text
from wsi_assist.slide import describe


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLIP vision (32 px, patch 8) + Llama (2 layers) LLaVA, a BPE tokenizer trained
    locally with <image>, CLIPImageProcessor, LlavaProcessor + chat template; saved."""
    return random_vlm.build_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_vlm.build_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def test_tiny_llava_is_saved_in_real_format(tiny_llava: Path) -> None:
    cfg = json.loads((tiny_llava / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["model_type"] == "llama"
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert (tiny_llava / "model.safetensors").is_file()
    assert (tiny_llava / "tokenizer.json").is_file()


CLASSES = ["Tumor", "Stroma"]


def _make_run(slide: Path, out: Path, **caption: Any) -> pipeline.SlideRun:
    """A slide with tissue, tiles, fake embeddings, zero-shot probs and a Ki-67 model."""
    cfg = config_mod.load().with_overrides(caption=caption, parallelism={"device": "cpu"})
    out.mkdir(parents=True, exist_ok=True)
    group = store.open_store(out / "slide.zarr", mode="w")
    run = pipeline.SlideRun(path=slide, slide_id="s1", out_dir=out, config=cfg,
                            info=describe(slide), store=group)
    pipeline.run_stages(run, ("tissue", "tiles"))
    return run


def _add_findings(run: pipeline.SlideRun) -> None:
    n = run.store["coords"].shape[0]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store.write_array(run.store, "embeddings", emb.astype(np.float16), model="fake")
    p_tumor = np.linspace(0.95, 0.05, n).astype(np.float32)
    store.write_array(run.store, "zeroshot/probs", np.stack([p_tumor, 1 - p_tumor], 1))
    run.store["zeroshot"].attrs.update({"classes": CLASSES, "colors": [[200, 0, 0], [0, 0, 200]],
                                        "composition": {"Tumor": {"fraction": 0.5},
                                                        "Stroma": {"fraction": 0.5}}})
    x0, y0 = (int(v) for v in run.store["coords"][0])
    pts = np.array([[x0 + 10, y0 + 10], [x0 + 20, y0 + 30], [x0 + 40, y0 + 5],
                    [x0 - 50, y0 - 50]], np.float64)
    sub = run.store.require_group("submodels/ki67")
    store.write_array(sub, "points", pts)
    store.write_array(sub, "labels", np.array([0, 0, 1, 0], np.int16))
    sub.attrs.update({"task": "point-detection", "classes": ["positive", "negative"],
                      "counts": {"positive": 3, "negative": 1},
                      "scores": {"ki67_index": {"value": 0.75, "definition": "pos / all"}}})


@pytest.fixture
def count_generate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every generate() call on the LLaVA class."""
    from transformers import LlavaForConditionalGeneration

    calls: list[int] = []
    orig = LlavaForConditionalGeneration.generate

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", spy)
    return calls


def test_caption_stage_batched_with_findings_and_cache(
        svs_slide: Path, tmp_path: Path, tiny_llava: Path, count_generate: list[int]) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tiny_llava), top_k=2,
                    batch_size=3, max_new_tokens=6)
    _add_findings(run)
    summary = pipeline.STAGE_FUNCS["caption"](run)
    caps = json.loads((run.out_dir / "captions.json").read_text())
    assert len(caps) == 4 and summary["generated"] == 4 and summary["cached"] == 0
    assert count_generate == [3, 1]
    assert {c["class"] for c in caps} == set(CLASSES)
    first = next(c for c in caps if (c["x"], c["y"]) == tuple(run.store["coords"][0]))
    assert "Zero-shot tissue class: Tumor (probability 0.95)" in first["prompt"]
    assert "ki67: positive: 2, negative: 1" in first["prompt"]
    assert all(isinstance(c["caption"], str) and c["n_tokens"] >= 1 for c in caps)
    grid = store.read_grid(run.store)
    with run.open_slide() as s:
        want = represent.read_tiles(s, grid, [0])[0]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(run.out_dir / first["tile_png"])), want)
    doc = json.loads((run.out_dir / "summary.json").read_text())
    assert doc["draft"] is True and doc["provenance"]["method"] == "template"
    assert "Tumor 50%" in doc["text"] and "ki67_index = 0.75" in doc["text"]

    again = pipeline.STAGE_FUNCS["caption"](run)
    assert count_generate == [3, 1]  # no new generate calls
    assert again["cached"] == 4 and again["generated"] == 0
    assert json.loads((run.out_dir / "captions.json").read_text()) == caps

    other = _make_run(svs_slide, tmp_path / "s1b", model=str(tiny_llava), top_k=2,
                      batch_size=3, max_new_tokens=6, prompt="Describe. {findings}")
    _add_findings(other)
    assert pipeline.STAGE_FUNCS["caption"](other)["generated"] == 4  # new prompt, new key


def test_captioner_matches_unbatched(tiny_llava: Path) -> None:
    from wsi_assist.models.captioner import Captioner

    cap = Captioner(str(tiny_llava), "cpu")
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["short", "a much longer prompt about tumor nuclei and stroma", "mid prompt"]
    batched = cap.caption(imgs, prompts, max_new_tokens=5, batch_size=3)
    single = cap.caption(imgs, prompts, max_new_tokens=5, batch_size=1)
    assert [c.text for c in batched] == [c.text for c in single]
    assert "short" in cap.render("short") and "<image>" in cap.render("short")


def test_no_captioner_is_skipped(svs_slide: Path, tmp_path: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1")
    pipeline.run_stages(run, ("caption",))
    assert "caption.model" in run.summary["caption"]["skipped"]
    assert "caption.model" in run.store.attrs["caption_skipped"]
    assert not (run.out_dir / "captions.json").exists()


def test_missing_model_is_model_error(svs_slide: Path, tmp_path: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="nope"):
        pipeline.STAGE_FUNCS["caption"](run)


def test_llm_summary_and_fallback_selection(svs_slide: Path, tmp_path: Path,
                                            tiny_llava: Path, tiny_lm: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tiny_llava), fallback_k=3,
                    max_new_tokens=4, summary_model=str(tiny_lm), summary_max_new_tokens=5)
    n = run.store["coords"].shape[0]
    out = pipeline.STAGE_FUNCS["caption"](run)
    caps = json.loads((run.out_dir / "captions.json").read_text())
    coords = run.store["coords"][...]
    want = [tuple(int(v) for v in coords[r]) for r in (0, round((n - 1) / 2), n - 1)]
    assert out["selection"] == "tissue fraction" and [(c["x"], c["y"]) for c in caps] == want
    assert [c["reason"] for c in caps] == ["tissue"] * 3
    assert "none available" in caps[0]["prompt"]
    doc = json.loads((run.out_dir / "summary.json").read_text())
    assert doc["draft"] is True and doc["provenance"]["method"] == "llm"
    assert doc["provenance"]["model"] == str(tiny_lm) and isinstance(doc["text"], str)


def test_queries_use_pathclip_text_encoder(svs_slide: Path, tmp_path: Path, tiny_llava: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tiny_llava), top_k=1,
                    max_new_tokens=3, queries=["mitotic figures"], query_k=1)
    _add_findings(run)
    emb = np.asarray(run.store["embeddings"][...], np.float32)
    target = len(emb) // 2
    seen: list[tuple[str, list[str]]] = []
    from wsi_assist.models import pathclip

    def encode_text(spec: str, texts: list[str]) -> np.ndarray:
        seen.append((spec, texts))
        return emb[[target]]

    monkeypatch.setattr(pathclip, "encode_text", encode_text)
    pipeline.STAGE_FUNCS["caption"](run)
    caps = json.loads((run.out_dir / "captions.json").read_text())
    hit = [c for c in caps if c["reason"] == "query: mitotic figures"]
    assert seen == [("fake", ["mitotic figures"])]
    assert [(h["x"], h["y"]) for h in hit] == [tuple(run.store["coords"][target])]


def test_farthest_point_and_by_class_are_diverse() -> None:
    # six near-duplicates of one direction (most probable) and one tile pointing elsewhere
    emb = np.array([[1, 0.01 * i] for i in range(6)] + [[0, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    probs = np.array([[0.99 - 0.01 * i, 0.01 + 0.01 * i] for i in range(7)], np.float32)
    picks = represent.by_class(probs, ["A", "B"], k=2, embeddings=emb, pool=7)
    assert [p.row for p in picks] == [0, 6]
    plain = represent.by_class(probs, ["A", "B"], k=2)
    assert [p.row for p in plain] == [0, 1]
    assert list(represent.farthest_point(emb, 3, first=6))[:2] == [6, 0]


def test_retrieve_is_cosine_top_k() -> None:
    emb = np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    rows, sims = represent.retrieve(emb, np.array([0, 5.0]), 2)
    assert list(rows) == [2, 1] and np.allclose(sims, [1.0, 0.8])
    with pytest.raises(ValueError, match="dimension"):
        represent.retrieve(emb, np.ones(3), 1)


def test_findings_text_and_prompt() -> None:
    f = {"class": "Tumor", "prob": 0.876, "second": ("Stroma", 0.1),
         "submodels": {"her2": {"counts": {"3+": 4}}, "lbc": {"label": "HSIL", "prob": 0.7}}}
    text = findings_text(f)
    assert "Tumor (probability 0.88); next: Stroma (0.10)" in text
    assert "- her2: 3+: 4" in text and "- lbc: label HSIL (probability 0.70)" in text
    assert build_prompt("Q", f).startswith("Q\nFindings") and text in build_prompt("Q", f)


def test_tile_findings_counts_points_inside_tile(svs_slide: Path, tmp_path: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1")
    _add_findings(run)
    grid = store.read_grid(run.store)
    f0, f1 = tile_findings(run.store, grid, [0, 1])
    assert f0["submodels"]["ki67"]["counts"] == {"positive": 2, "negative": 1}
    assert f1["submodels"]["ki67"]["counts"] == {"positive": 0, "negative": 0}
    n = run.store["coords"].shape[0]
    cls = run.store.require_group("submodels/lbc")
    probs = np.tile(np.array([[0.2, 0.8]], np.float32), (n, 1))
    store.write_array(cls, "probs", probs)
    store.write_array(cls, "labels", np.ones(n, np.int16))
    cls.attrs.update({"task": "tile-classification", "classes": ["NILM", "HSIL"]})
    (f1,) = tile_findings(run.store, grid, [1])
    assert f1["submodels"]["lbc"] == {"label": "HSIL", "prob": pytest.approx(0.8)}


def test_dtype_cpu_is_float32() -> None:
    import torch

    from wsi_assist.models.captioner import resolve_dtype
    assert resolve_dtype("cpu") is torch.float32
    assert resolve_dtype("cuda", "float16") is torch.float16


def test_params_validate() -> None:
    with pytest.raises(ValueError, match="^batch_size"):
        CaptionParams(batch_size=0)
    with pytest.raises(ValueError, match="^queries"):
        CaptionParams(queries=[" "])
    assert config_mod.load().caption == CaptionParams()


def test_cli_run_query_reaches_config(svs_slide: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_assist.cli import app

    res = CliRunner().invoke(app, ["run", str(svs_slide), "-o", str(tmp_path / "out"),
                                   "--stages", "tissue,tiles,caption",
                                   "--query", "mitotic figures", "--query", "necrosis"])
    assert res.exit_code == 0, res.output
    cfg = config_mod.load(tmp_path / "out" / "config.yaml")
    assert cfg.caption.queries == ["mitotic figures", "necrosis"]
    done = json.loads((tmp_path / "out" / "aperio" / "done.json").read_text())
    assert "caption.model" in done["summary"]["caption"]["skipped"]


def test_batch_rerun_reuses_cache(svs_slide: Path, tmp_path: Path, tiny_llava: Path,
                                  count_generate: list[int]) -> None:
    from wsi_assist import batch

    cfg = config_mod.from_dict({"stages": ["tissue", "tiles", "caption"],
                                "parallelism": {"device": "cpu"},
                                "caption": {"model": str(tiny_llava), "fallback_k": 2,
                                            "max_new_tokens": 3}})
    out = tmp_path / "out"
    assert batch.run_batch([svs_slide], out, cfg)[0].status == "done"
    first = json.loads((out / "aperio" / "captions.json").read_text())
    assert count_generate == [2]
    assert (out / ".cache" / "captions" / "aperio.json").is_file()
    assert batch.run_batch([svs_slide], out, cfg)[0].status == "skipped"  # resumed
    assert batch.run_batch([svs_slide], out, cfg, force=True)[0].status == "done"
    assert count_generate == [2]  # the forced rerun generated nothing: cache hits
    assert json.loads((out / "aperio" / "captions.json").read_text()) == first
    assert all((out / "aperio" / c["tile_png"]).is_file() for c in first)
