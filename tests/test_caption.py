"""Caption stage: a tiny LLaVA built here and loaded through the real code path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from random_vlm import build_causal_lm, build_llava
from stage_helper import run_slide, run_stage

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from wsi_assist import config as config_mod
from wsi_assist import represent
from wsi_assist.caption import tile_findings
from wsi_assist.errors import ModelError
from wsi_assist.models.captioner import build_prompt, findings_text
from wsi_assist.settings import CaptionParams
from wsi_assist.stages import SlideContext, run_stages
from wsi_assist.store import Embeddings, ZeroShot


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLIP vision (32 px, patch 8) + Llama (2 layers) LLaVA, a BPE tokenizer trained
    locally with <image>, CLIPImageProcessor, LlavaProcessor + chat template; saved."""
    return build_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def test_tiny_llava_is_saved_in_real_format(tiny_llava: Path) -> None:
    cfg = json.loads((tiny_llava / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["model_type"] == "llama"
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert (tiny_llava / "model.safetensors").is_file()
    assert (tiny_llava / "tokenizer.json").is_file()


CLASSES = ["Tumor", "Stroma"]


class Run:
    """A slide with tissue and tiles, and the config its caption stage runs with."""

    def __init__(self, slide: Path, out: Path, **caption: Any) -> None:
        self.cfg = config_mod.override(config_mod.load(), caption=caption,
                                       parallelism={"device": "cpu"})
        self.ctx: SlideContext = run_slide(slide, out, self.cfg, ("tissue", "tiles"),
                                           slide_id="s1")[0]
        self.store, self.out_dir = self.ctx.store, self.ctx.out_dir
        self.coords = self.store.read_grid().coords

    def caption(self) -> dict:
        return run_stage(self.ctx, self.cfg, "caption")


def _make_run(slide: Path, out: Path, **caption: Any) -> Run:
    """A slide with tissue, tiles; findings follow with :func:`_add_findings`."""
    return Run(slide, out, **caption)


def _add_findings(run: Run) -> None:
    """Fake embeddings, zero-shot probs and a Ki-67 model."""
    n = len(run.coords)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    run.store.write_embeddings(Embeddings(emb.astype(np.float16), model="fake",
                                          model_sha256="0" * 64))
    p_tumor = np.linspace(0.95, 0.05, n).astype(np.float32)
    probs = np.stack([p_tumor, 1 - p_tumor], 1)
    run.store.write_zeroshot(ZeroShot(
        classes=CLASSES, colors=[(200, 0, 0), (0, 0, 200)], probs=probs,
        top=probs.argmax(axis=1), uncertain=np.zeros(n, bool),
        composition={"Tumor": {"fraction": 0.5}, "Stroma": {"fraction": 0.5}}))
    x0, y0 = (int(v) for v in run.coords[0])
    pts = np.array([[x0 + 10, y0 + 10], [x0 + 20, y0 + 30], [x0 + 40, y0 + 5],
                    [x0 - 50, y0 - 50]], np.float64)
    run.store.write_submodel("ki67", {"points": pts,
                                      "labels": np.array([0, 0, 1, 0], np.int16)},
                             {"task": "point-detection", "classes": ["positive", "negative"],
                              "counts": {"positive": 3, "negative": 1},
                              "scores": {"ki67_index": {"value": 0.75,
                                                        "definition": "pos / all"}}})


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
    summary = run.caption()
    caps = json.loads((run.out_dir / "captions.json").read_text())
    assert len(caps) == 4 and summary["generated"] == 4 and summary["cached"] == 0
    assert count_generate == [3, 1]
    assert {c["class"] for c in caps} == set(CLASSES)
    first = next(c for c in caps if (c["x"], c["y"]) == tuple(run.coords[0]))
    assert "Zero-shot tissue class: Tumor (probability 0.95)" in first["prompt"]
    assert "ki67: positive: 2, negative: 1" in first["prompt"]
    assert all(isinstance(c["caption"], str) and c["n_tokens"] >= 1 for c in caps)
    grid = run.store.read_grid()
    with run.ctx.open_slide() as s:
        want = represent.read_tiles(s, grid, [0])[0]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(run.out_dir / first["tile_png"])), want)
    doc = json.loads((run.out_dir / "summary.json").read_text())
    assert doc["draft"] is True and doc["provenance"]["method"] == "template"
    assert "Tumor 50%" in doc["text"] and "ki67_index = 0.75" in doc["text"]

    again = run.caption()
    assert count_generate == [3, 1]  # no new generate calls
    assert again["cached"] == 4 and again["generated"] == 0
    assert json.loads((run.out_dir / "captions.json").read_text()) == caps

    other = _make_run(svs_slide, tmp_path / "s1b", model=str(tiny_llava), top_k=2,
                      batch_size=3, max_new_tokens=6, prompt="Describe. {findings}")
    _add_findings(other)
    assert other.caption()["generated"] == 4  # new prompt, new key


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
    summary, _ = run_stages(run.ctx, run.cfg, ("caption",))
    assert "caption.model" in summary["caption"]["skipped"]
    assert "caption.model" in (run.store.skipped("caption") or "")
    assert not (run.out_dir / "captions.json").exists()


def test_missing_model_is_model_error(svs_slide: Path, tmp_path: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="nope"):
        run.caption()


def test_llm_summary_and_fallback_selection(svs_slide: Path, tmp_path: Path,
                                            tiny_llava: Path, tiny_lm: Path) -> None:
    run = _make_run(svs_slide, tmp_path / "s1", model=str(tiny_llava), fallback_k=3,
                    max_new_tokens=4, summary_model=str(tiny_lm), summary_max_new_tokens=5)
    n = len(run.coords)
    out = run.caption()
    caps = json.loads((run.out_dir / "captions.json").read_text())
    coords = run.coords
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
    emb = run.store.read_embeddings().vectors.astype(np.float32)
    target = len(emb) // 2
    seen: list[tuple[str, list[str]]] = []
    from wsi_assist.models import pathclip

    def encode_text(spec: str, texts: list[str]) -> np.ndarray:
        seen.append((spec, texts))
        return emb[[target]]

    monkeypatch.setattr(pathclip, "encode_text", encode_text)
    run.caption()
    caps = json.loads((run.out_dir / "captions.json").read_text())
    hit = [c for c in caps if c["reason"] == "query: mitotic figures"]
    assert seen == [("fake", ["mitotic figures"])]
    assert [(h["x"], h["y"]) for h in hit] == [tuple(run.coords[target])]


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
    grid = run.store.read_grid()
    f0, f1 = tile_findings(grid, [0, 1], run.store.read_zeroshot(), run.store.read_submodels())
    assert f0["submodels"]["ki67"]["counts"] == {"positive": 2, "negative": 1}
    assert f1["submodels"]["ki67"]["counts"] == {"positive": 0, "negative": 0}
    n = len(run.coords)
    probs = np.tile(np.array([[0.2, 0.8]], np.float32), (n, 1))
    run.store.write_submodel("lbc", {"probs": probs, "labels": np.ones(n, np.int16)},
                             {"task": "tile-classification", "classes": ["NILM", "HSIL"]})
    (f1,) = tile_findings(grid, [1], run.store.read_zeroshot(), run.store.read_submodels())
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
    assert list(cfg.caption.queries) == ["mitotic figures", "necrosis"]
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
