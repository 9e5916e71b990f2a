"""Model specs, safe checkpoint loading, device preprocessing and the embed stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from tinyclip import TINY_ARCH, register_tiny, save_tiny

from wsi_assist.errors import ModelError
from wsi_assist.models import pathclip
from wsi_assist.models.pathclip import configured_spec, load_model, parse_spec
from wsi_assist.settings import EmbedParams

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    register_tiny(d)
    return save_tiny(d / "tiny.pt")


def test_spec_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pathclip.PATHCLIP_ENV, raising=False)
    with pytest.raises(ModelError, match="embed.pathclip"):
        parse_spec("pathclip")
    assert configured_spec(EmbedParams()) is None
    s = parse_spec("pathclip", str(tmp_path / "a.pt"))
    assert (s.arch, s.quick_gelu, s.weights) == ("ViT-B-16", True, tmp_path / "a.pt")
    monkeypatch.setenv(pathclip.PATHCLIP_ENV, str(tmp_path / "env.pt"))
    assert parse_spec("pathclip").weights == tmp_path / "env.pt"
    assert parse_spec("pathclip", str(tmp_path / "cfg.pt")).weights == tmp_path / "cfg.pt"
    s = parse_spec("ViT-B-32:/x/quilt.pt")
    assert (s.arch, s.weights, s.quick_gelu) == ("ViT-B-32", Path("/x/quilt.pt"), False)
    assert parse_spec("hf-hub:org/model").hub == "hf-hub:org/model"
    with pytest.raises(ModelError, match="unknown open_clip architecture 'NoSuchNet'"):
        parse_spec("NoSuchNet:/x.pt")
    with pytest.raises(ModelError, match="expected 'pathclip'"):
        parse_spec("ViT-B-16")


def test_tiny_loads_through_the_loader(tiny_ckpt: Path) -> None:
    import open_clip
    import torch

    lm = load_model(f"{TINY_ARCH}:{tiny_ckpt}")
    assert (lm.embed_dim, lm.image_size) == (32, 32)
    assert lm.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    sd = torch.load(tiny_ckpt, weights_only=True)
    assert torch.equal(lm.model.state_dict()["visual.proj"], sd["visual.proj"])
    assert load_model(f"{TINY_ARCH}:{tiny_ckpt}") is lm  # loaded once


def test_bad_files_are_refused_with_the_file_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    import torch

    spec = f"{TINY_ARCH}:{{}}"
    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelError, match=f"{missing}: model file not found.*{TINY_ARCH}"):
        load_model(spec.format(missing))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(tiny_ckpt.read_bytes()[:5000])
    with pytest.raises(ModelError, match=f"{trunc}: cannot read.*{TINY_ARCH} state_dict"):
        load_model(spec.format(trunc))
    sd = torch.load(tiny_ckpt, weights_only=True)
    sd["visual.proj"] = torch.zeros(64, 16)
    wrong = tmp_path / "wrong.pt"
    torch.save(sd, wrong)
    with pytest.raises(ModelError, match=r"wrong.pt: does not match open_clip wsi-tiny-vit: "
                                         r"1 shape mismatches .*'visual.proj': file \(64, 16\)"):
        load_model(spec.format(wrong))
    del sd["visual.proj"]
    torch.save(sd, wrong)
    with pytest.raises(ModelError, match="1 missing keys"):
        load_model(spec.format(wrong))


def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "f": os.getcwd}, evil)  # a callable: not weights-only
    with pytest.raises(ModelError, match="evil.pt: cannot read"):
        load_model(f"{TINY_ARCH}:{evil}")


@pytest.mark.slow
def test_full_size_pathclip_checkpoint(tmp_path: Path) -> None:
    """A random ViT-B-16 (QuickGELU) state_dict with pathclip-base.pt's keys and shapes."""
    import open_clip
    import torch

    t0 = time.perf_counter()
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True, load_weights=False)
    ckpt = tmp_path / "pathclip-base.pt"
    sd = model.state_dict()
    torch.save(sd, ckpt)
    lm = load_model("pathclip", pathclip=str(ckpt))
    assert (lm.embed_dim, lm.image_size) == (512, 224)
    assert lm.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert torch.equal(lm.model.state_dict()["text_projection"], sd["text_projection"])
    sd["visual.conv1.weight"] = torch.zeros(768, 3, 32, 32)  # a ViT-B-32 patch embedding
    torch.save(sd, ckpt)
    with pytest.raises(ModelError, match=r"pathclip-base.pt: does not match open_clip "
                                         r"ViT-B-16.*visual.conv1.weight"):
        load_model("pathclip", pathclip=str(ckpt))
    print(f"full-size load test: {time.perf_counter() - t0:.1f} s")


def test_device_preprocessing_matches_open_clip() -> None:
    """Resize + normalise on the device equals open_clip's PIL pipeline closely."""
    import open_clip
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tiles = np.asarray([np.asarray(Image.fromarray(t).resize((64, 64))) for t in tiles])
    ours = pathclip.preprocess(torch.from_numpy(tiles), 64, open_clip.OPENAI_DATASET_MEAN,
                               open_clip.OPENAI_DATASET_STD)
    _, _, ref_tf = open_clip.create_model_and_transforms(TINY_ARCH, load_weights=False,
                                                         force_image_size=64)
    ref = torch.stack([ref_tf(Image.fromarray(t)) for t in tiles])
    assert ours.shape == (2, 3, 64, 64)
    assert torch.allclose(ours, ref, atol=1e-5)
    small = pathclip.preprocess(torch.from_numpy(tiles), 32, (0.0,) * 3, (1.0,) * 3)
    assert small.shape == (2, 3, 32, 32) and 0 <= float(small.min()) <= float(small.max()) <= 1


def test_encoders_are_normalised_and_deterministic(tiny_ckpt: Path) -> None:
    import torch

    lm = load_model(f"{TINY_ARCH}:{tiny_ckpt}")
    tiles = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    a = pathclip.encode_images(lm, torch.from_numpy(tiles)).numpy()
    assert a.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    b = pathclip.encode_images(lm, torch.from_numpy(tiles[1:2])).numpy()
    np.testing.assert_allclose(a[1:2], b, atol=1e-5)
    t = pathclip.encode_text(lm, ["An H&E image of tumor.", "An H&E image of fat."])
    assert t.shape == (2, 32) and not np.allclose(t[0], t[1])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


def test_onnx_export_parity_and_engine(tiny_ckpt: Path, tmp_path: Path, svs_slide: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from exporters import pathclip_onnx
    from wsi_assist import config as config_mod
    from wsi_assist.batch import run_batch
    from wsi_assist.models.embed import OnnxEncoder
    from wsi_assist.store import SlideStore

    spec = f"{TINY_ARCH}:{tiny_ckpt}"
    onnx_path = tmp_path / "enc.onnx"
    assert pathclip_onnx.main([spec, "-o", str(onnx_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_diff"] < 1e-3
    enc = OnnxEncoder(onnx_path, "cpu")
    tiles = np.random.default_rng(2).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    got = enc.submit(tiles)  # dynamic batch: 5 rows, exported with 2
    ref = pathclip.encode_images(load_model(spec), torch.from_numpy(tiles)).numpy()
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(ModelError, match="exported from weights .* re-export"):
        OnnxEncoder(onnx_path, "cpu", expect_sha256="f" * 64)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx_path.read_bytes()[:2000])
    with pytest.raises(ModelError, match="bad.onnx: onnxruntime cannot load it"):
        OnnxEncoder(bad, "cpu")
    monkeypatch.setattr(pathclip_onnx, "parity", lambda *a, **k: 0.5)
    assert pathclip_onnx.main([spec, "-o", str(tmp_path / "x.onnx")]) == 1
    assert "parity check failed: max abs difference 0.5" in capsys.readouterr().err

    d = config_mod.load().to_dict()
    d["stages"] = ["tissue", "tiles", "embed"]
    d["embed"].update({"model": spec, "engine": "onnx", "onnx": str(onnx_path)})
    d["parallelism"]["device"] = "cpu"
    res = run_batch([svs_slide], tmp_path / "onnx_out", config_mod.from_dict(d))
    d["embed"]["engine"] = "torch"
    res += run_batch([svs_slide], tmp_path / "torch_out", config_mod.from_dict(d))
    assert [r.status for r in res] == ["done", "done"], res[0].error
    a, b = (SlideStore(tmp_path / o / res[0].slide_id, "r").read_embeddings().vectors
            .astype(np.float32) for o in ("onnx_out", "torch_out"))
    assert a.shape == b.shape and len(a) > 0
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_models_command(tiny_ckpt: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from wsi_assist.cli import app

    monkeypatch.delenv(pathclip.PATHCLIP_ENV, raising=False)
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0 and "not configured" in r.output and "crc100k" in r.output
    r = CliRunner().invoke(app, ["models", "--model", f"{TINY_ARCH}:{tiny_ckpt}"])
    assert r.exit_code == 0, r.output
    assert "loads: wsi-tiny-vit" in r.output and "32-d" in r.output
    missing = tmp_path / "nope.pt"
    r = CliRunner().invoke(app, ["models", "--pathclip", str(missing)])
    assert r.exit_code == 1
    assert "MISSING" in r.output and f"{missing}: model file not found" in r.output


@pytest.mark.gpu
def test_cuda_autocast_matches_cpu(tiny_ckpt: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from wsi_assist.models.embed import TorchEncoder, embed_batches
    from wsi_assist.stream import TileBatch

    tiles = np.random.default_rng(4).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    batches = [TileBatch(np.arange(i, min(i + 4, 10)), tiles[i:i + 4]) for i in (0, 4, 8)]
    cpu = embed_batches(TorchEncoder(load_model(f"{TINY_ARCH}:{tiny_ckpt}")), batches, 10)
    for precision in ("bf16", "fp16", "fp32"):
        enc = TorchEncoder(load_model(f"{TINY_ARCH}:{tiny_ckpt}", "cuda"), precision)
        gpu = embed_batches(enc, batches, 10)
        np.testing.assert_allclose(gpu.embeddings.astype(np.float32),
                                   cpu.embeddings.astype(np.float32), atol=3e-2)


def test_hub_model_offline_is_a_clear_error() -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE was set")
    with pytest.raises(ModelError, match="hf-hub:org/no-such-model: cannot load from the "
                                         "Hugging Face hub"):
        load_model("hf-hub:org/no-such-model")
