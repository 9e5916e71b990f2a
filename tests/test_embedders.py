"""Embedders as their authors release them: tiny random models saved in each family's
real folder layout, loaded through the user's path (spec -> loader -> embed stage), and
checked against the library's own preprocessing and forward pass; MIL feature files read
back as TRIDENT and CLAM read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_assist.errors import ModelError
from wsi_assist.models import pathclip
from wsi_assist.models.pathclip import load_model, parse_spec

OPEN_CLIP_CFG = {
    "model_cfg": {"embed_dim": 32, "quick_gelu": True,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16,
                                 "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 2}},
    "preprocess_cfg": {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.26, 0.27]},
}
MEAN, STD = [0.70, 0.58, 0.70], [0.21, 0.23, 0.18]  # H-optimus-style, not ImageNet's


def tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def ours(spec: str, x: np.ndarray, raw: bool = True) -> np.ndarray:
    import torch

    return pathclip.encode_images(load_model(spec), torch.from_numpy(x), "fp32", raw=raw).numpy()


def pil(x: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(t) for t in x]


# --- open_clip hub folder (QuiltNet, PathGen-CLIP) -----------------------------------------

def save_open_clip_dir(folder: Path, seed: int = 0, safetensors: bool = True) -> Path:
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CFG))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    sd = model.state_dict()
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()},
                  str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.mark.parametrize("safetensors", [True, False])
def test_open_clip_folder_matches_open_clip_pipeline(tmp_path: Path, safetensors: bool) -> None:
    import open_clip
    import torch

    folder = save_open_clip_dir(tmp_path / "quiltnet", safetensors=safetensors)
    for spec in (f"open_clip:{folder}", str(folder)):  # explicit kind, and told from files
        s = parse_spec(spec)
        assert s.kind == "open_clip" and s.quick_gelu  # QuickGELU from the config
    lm = load_model(f"open_clip:{folder}")
    assert isinstance(lm.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert lm.mean == pytest.approx((0.5, 0.45, 0.4)) and lm.std == pytest.approx((0.25, 0.26, 0.27))
    model, _, prep = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    x = tiles(3, 32)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([prep(im) for im in pil(x)])).numpy()
        tok = open_clip.get_tokenizer(f"local-dir:{folder}")
        ref_t = model.encode_text(tok(["An H&E image of tumor."])).numpy()
    np.testing.assert_allclose(ours(f"open_clip:{folder}", x), ref, atol=1e-5)
    got_t = pathclip.encode_text(f"open_clip:{folder}", ["An H&E image of tumor."])
    np.testing.assert_allclose(got_t, ref_t / np.linalg.norm(ref_t), atol=1e-5)


def test_open_clip_folder_strict_and_bad_specs(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    folder = save_open_clip_dir(tmp_path / "oc")
    w = folder / "open_clip_model.safetensors"
    sd = load_file(str(w))
    del sd["visual.proj"]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(w))
    with pytest.raises(ModelError, match=r"open_clip_model.safetensors: does not match .*"
                       r"1 missing keys \(e.g. 'visual.proj'\); 1 unexpected keys "
                       r"\(e.g. 'extra.weight'\)"):
        load_model(f"open_clip:{folder}")
    with pytest.raises(ModelError, match="expected 'pathclip'.*open_clip:/dir.*hf-clip:/dir.*timm:"):
        parse_spec("nonsense-kind:/x")
    with pytest.raises(ModelError, match="is not a folder"):
        parse_spec(f"timm:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder of a known kind"):
        parse_spec(str(tmp_path / "empty"))
    (w).unlink()
    with pytest.raises(ModelError, match="no weights file"):
        parse_spec(f"open_clip:{folder}")


# --- transformers CLIPModel folder (PLIP, PathGen-CLIP-L) ----------------------------------

def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode characters (a BPE vocabulary without merges)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_hf_clip_dir(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp := folder / "_tok").mkdir()
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt")).save_pretrained(folder)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": len(vocab) - 2,
                     "eos_token_id": len(vocab) - 1, "pad_token_id": len(vocab) - 1},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2},
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


def test_hf_clip_folder_embeddings_text_and_zero_shot(tmp_path: Path) -> None:
    import torch
    from transformers import AutoProcessor, CLIPModel

    from wsi_assist.models import zeroshot as zs

    folder = save_hf_clip_dir(tmp_path / "plip")
    spec = parse_spec(str(folder))
    assert spec.kind == "hf-clip" and spec.quick_gelu  # CLIP's hidden_act: quick_gelu
    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = AutoProcessor.from_pretrained(str(folder))
    x = tiles(3, 32)
    texts = ["An H&E image of tumor.", "An H&E image of adipose tissue."]
    with torch.no_grad():
        inputs = proc(images=pil(x), text=texts, return_tensors="pt", padding=True)
        out = model(**inputs)
    np.testing.assert_allclose(ours(f"hf-clip:{folder}", x, raw=False),
                               out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(pathclip.encode_text(f"hf-clip:{folder}", texts),
                               out.text_embeds.numpy(), atol=1e-5)
    prompts = zs.PromptSet("t", (zs.PromptClass("tumor", (255, 0, 0), (texts[0],)),
                                 zs.PromptClass("fat", (0, 0, 255), (texts[1],))))
    te = zs.text_embeddings(f"hf-clip:{folder}", prompts)
    probs = zs.classify(ours(f"hf-clip:{folder}", x, raw=False), te)
    np.testing.assert_allclose(probs, out.logits_per_image.softmax(-1).numpy(), atol=1e-4)


def test_hf_clip_strict_loading(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = save_hf_clip_dir(tmp_path / "plip")
    w = folder / "model.safetensors"
    sd = load_file(str(w))
    del sd["visual_projection.weight"]
    save_file(sd, str(w), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model.safetensors: does not match transformers "
                       r"CLIPModel .*1 missing keys \(e.g. 'visual_projection.weight'\)"):
        load_model(f"hf-clip:{folder}")


# --- timm hub folder (UNI, UNI2, Virchow2, H-optimus, Prov-GigaPath) ------------------------

def save_timm_dir(folder: Path, model_args: dict[str, Any], global_pool: str = "token",
                  crop_pct: float = 1.0, seed: int = 0, safetensors: bool = False) -> Path:
    """A timm hub folder as ``push_to_hf_hub`` writes it: config.json with architecture,
    num_classes, num_features, global_pool, model_args and pretrained_cfg; weights."""
    import timm
    import timm.layers
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    resolved = {k: {"timm.layers.SwiGLUPacked": timm.layers.SwiGLUPacked,
                    "torch.nn.SiLU": torch.nn.SiLU}.get(v, v) if isinstance(v, str) else v
                for k, v in model_args.items()}
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **resolved)
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 0,
           "num_features": model.num_features, "global_pool": global_pool,
           "model_args": model_args,
           "pretrained_cfg": {"tag": "tiny", "custom_load": False, "input_size": [3, 32, 32],
                              "fixed_input_size": True, "interpolation": "bicubic",
                              "crop_pct": crop_pct, "crop_mode": "center", "mean": MEAN,
                              "std": STD, "num_classes": 0, "pool_size": None,
                              "first_conv": "patch_embed.proj", "classifier": "head"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    if safetensors:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(folder / "model.safetensors"))
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


UNI_ARGS = {"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3,
            "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
VIRCHOW_ARGS = {**UNI_ARGS, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
                "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


def _timm_reference(folder: Path, x: np.ndarray) -> np.ndarray:
    """timm's own pipeline: create_model from the local folder, its data config's eval
    transform on PIL images, forward."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        return model(torch.stack([transform(im) for im in pil(x)])).numpy()


@pytest.mark.parametrize("safetensors", [False, True])
def test_timm_folder_matches_timm_pipeline(tmp_path: Path, safetensors: bool) -> None:
    folder = save_timm_dir(tmp_path / "uni", UNI_ARGS, safetensors=safetensors)
    spec = parse_spec(str(folder))
    assert spec.kind == "timm" and spec.arch == "vit_tiny_patch16_224"
    lm = load_model(f"timm:{folder}")
    assert lm.mean == pytest.approx(tuple(MEAN)) and not lm.has_text
    x = tiles(3, 32)
    np.testing.assert_allclose(ours(f"timm:{folder}", x), _timm_reference(folder, x),
                               atol=1e-5)


def test_timm_crop_pct_follows_timm(tmp_path: Path) -> None:
    """crop_pct < 1: resize to size / crop_pct, centre-crop (tiles already that size, so
    no resampling differs between PIL and torch)."""
    folder = save_timm_dir(tmp_path / "hopt", UNI_ARGS, crop_pct=0.8)
    x = tiles(2, 40)  # floor(32 / 0.8) = 40
    assert load_model(f"timm:{folder}").resize_px == 40
    np.testing.assert_allclose(ours(f"timm:{folder}", x), _timm_reference(folder, x),
                               atol=1e-5)


def test_virchow_style_tokens_give_class_and_mean_patch_tokens(tmp_path: Path) -> None:
    import timm
    import timm.layers
    import torch

    folder = save_timm_dir(tmp_path / "virchow2", VIRCHOW_ARGS, global_pool="")
    x = tiles(2, 32)
    got = ours(f"timm:{folder}", x)
    args = {**VIRCHOW_ARGS, "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    model.load_state_dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    lm = load_model(f"timm:{folder}")
    with torch.no_grad():
        xx = pathclip.preprocess(torch.from_numpy(x), 32, lm.mean, lm.std)
        tok = model(xx)  # (N, 1 + 4 registers + patches, D), as Virchow2's card shows
        ref = torch.cat([tok[:, 0], tok[:, 5:].mean(1)], dim=-1).numpy()
    assert got.shape == (2, 96)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_timm_config_cannot_name_arbitrary_code_and_is_strict(tmp_path: Path) -> None:
    import torch

    folder = save_timm_dir(tmp_path / "evil", UNI_ARGS)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"]["act_layer"] = "os.system"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model_args.act_layer names 'os.system', which is "
                                         r"not one of the layer classes allowed"):
        load_model(f"timm:{folder}")
    folder = save_timm_dir(tmp_path / "cut", UNI_ARGS)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del sd["cls_token"]
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model.bin: does not match timm "
                                         r"vit_tiny_patch16_224.*'cls_token'"):
        load_model(f"timm:{folder}")
    cfg["architecture"], cfg["model_args"]["act_layer"] = "no_such_vit", "gelu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="timm cannot build architecture 'no_such_vit' "
                                         r"\(unrecognised architecture"):
        load_model(f"timm:{folder}")


def test_image_only_encoders_refuse_text_in_words(tmp_path: Path) -> None:
    folder = save_timm_dir(tmp_path / "uni", UNI_ARGS)
    with pytest.raises(ModelError, match="image-only encoder with no text tower; zero-shot"):
        pathclip.encode_text(f"timm:{folder}", ["tumor"])


def test_text_queries_with_an_image_only_encoder_are_skipped_with_the_reason(
        tmp_path: Path) -> None:
    """caption.queries on timm embeddings: the tissue picks stay, the queries are skipped
    and the note says why (no text tower), as the zeroshot stage does; no error."""
    from wsi_assist import represent
    from wsi_assist.caption import choose
    from wsi_assist.errors import StageSkipped
    from wsi_assist.settings import CaptionParams
    from wsi_assist.store import Embeddings
    from wsi_assist.tiling import TileGrid

    folder = save_timm_dir(tmp_path / "uni", UNI_ARGS)
    spec = f"timm:{folder}"
    with pytest.raises(StageSkipped, match="image-only encoder with no text tower"):
        represent.encode_queries(spec, ["tumor"])
    n = 12
    vecs = ours(spec, tiles(n, 32), raw=False)
    grid = TileGrid(coords=np.arange(2 * n, dtype=np.int64).reshape(n, 2) * 256,
                    tissue_fraction=np.linspace(0.2, 1.0, n).astype(np.float32), level=0,
                    level_downsample=1.0, read_px=256, stride_px=256, tile_px=224,
                    target_mpp=0.5, mpp=0.5, delivered_mpp=0.5)
    emb = Embeddings(vectors=vecs, model=spec, model_sha256="0" * 64)
    params = CaptionParams(queries=("tumor cells",), fallback_k=4)
    picks, notes = choose(grid, params, emb, None)
    assert len(picks) == 4 and all(p.reason == "tissue" for p in picks)
    assert "no text tower" in notes["queries_skipped"]
    assert spec in notes["queries_skipped"]


# --- transformers image encoder (Phikon-v2: Dinov2Model) -----------------------------------

def save_dinov2_dir(folder: Path, seed: int = 0, crop: int = 32, resize: int = 32) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    Dinov2Model(cfg).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                      do_center_crop=True, image_mean=MEAN, image_std=STD,
                      do_convert_rgb=True).save_pretrained(folder)
    return folder


def test_dinov2_folder_matches_transformers_pipeline(tmp_path: Path) -> None:
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    folder = save_dinov2_dir(tmp_path / "phikon-v2")
    assert parse_spec(str(folder)).kind == "hf"
    model = Dinov2Model.from_pretrained(str(folder)).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder))
    x = tiles(3, 32)
    with torch.no_grad():
        ref = model(**proc(images=pil(x), return_tensors="pt")).last_hidden_state[:, 0]
    np.testing.assert_allclose(ours(f"hf:{folder}", x), ref.numpy(), atol=1e-4)


def test_dinov2_resize_and_crop_follow_the_processor(tmp_path: Path) -> None:
    """Phikon-v2 style (shortest edge 256, crop 224) scaled down: 36 -> crop 32. PIL and
    torch resample differently, so this compares closely, not exactly."""
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    folder = save_dinov2_dir(tmp_path / "p2", resize=36)
    lm = load_model(f"hf:{folder}")
    assert (lm.resize_px, lm.image_size) == (36, 32)
    model = Dinov2Model.from_pretrained(str(folder)).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder))
    x = np.repeat(np.repeat(tiles(2, 16, seed=3), 4, axis=1), 4, axis=2)  # 64 px, blocky
    pixels = proc(images=pil(x), return_tensors="pt")["pixel_values"]
    mine = pathclip.preprocess(torch.from_numpy(x), 32, lm.mean, lm.std, resize_px=36)
    # PIL and torch bicubic differ a little; a crop off by 2 px differs by > 1 (measured)
    assert float((mine - pixels).abs().mean()) < 0.05
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    got = ours(f"hf:{folder}", x)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


# --- through the batch: embed stage, feature files, zero-shot ------------------------------

def _run(tmp_path: Path, slide: Path, model: str, out: str, stages: list[str]) -> Any:
    from wsi_assist import config as config_mod
    from wsi_assist.batch import run_batch

    d = config_mod.load().to_dict()
    d["stages"] = stages
    d["embed"]["model"] = model
    d["parallelism"]["device"] = "cpu"
    d["tiling"]["tile_px"] = 64  # the models take 32 px: the stage resizes
    res = run_batch([slide], tmp_path / out, config_mod.from_dict(d))
    assert [r.status for r in res] == ["done"], res[0].error
    return res[0]


def test_feature_file_reads_back_as_trident_and_clam_read_it(tmp_path: Path,
                                                              svs_slide: Path) -> None:
    import h5py

    from wsi_assist.store import SlideStore

    folder = save_timm_dir(tmp_path / "uni", UNI_ARGS)
    r = _run(tmp_path, svs_slide, f"timm:{folder}", "out",
             ["tissue", "tiles", "embed", "zeroshot"])
    slide_dir = tmp_path / "out" / r.slide_id
    store = SlideStore(slide_dir, "r")
    grid, emb = store.read_grid(), store.read_embeddings()
    assert emb is not None and "image-only" in (store.skipped("zeroshot") or "")
    h5 = slide_dir / "features" / "uni.h5"
    with h5py.File(h5, "r") as f:  # TRIDENT's read_coords / CLAM's dataset: these keys
        feats, coords = f["features"][:], f["coords"][:]
        cattrs, fattrs = dict(f["coords"].attrs), dict(f["features"].attrs)
    assert feats.dtype == np.float32 and feats.shape == (len(grid), 48)
    assert coords.shape == (len(grid), 2) and np.issubdtype(coords.dtype, np.integer)
    np.testing.assert_array_equal(coords, grid.coords)
    # the model's own (unnormalised) output; the store keeps unit vectors of the same rows
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, emb.vectors.astype(np.float32), atol=2e-3)
    assert fattrs["encoder"] == f"timm:{folder}" and not fattrs["l2_normalised"]
    # TRIDENT: patch_size_src = patch_size * level0_mag / target_mag = patch_size_level0
    src = cattrs["patch_size"] * cattrs["level0_magnification"] / cattrs["target_magnification"]
    assert round(src) == cattrs["patch_size_level0"] == round(grid.size_l0)
    assert cattrs["patch_size"] == grid.tile_px and cattrs["name"] == r.slide_id
    assert cattrs["patch_level"] == grid.level  # CLAM
    import tiffslide

    with tiffslide.TiffSlide(svs_slide) as ts:
        assert (cattrs["level0_width"], cattrs["level0_height"]) == ts.dimensions


def test_hf_clip_through_the_batch_gives_zero_shot(tmp_path: Path, svs_slide: Path) -> None:
    from wsi_assist.store import SlideStore

    folder = save_hf_clip_dir(tmp_path / "plip")
    r = _run(tmp_path, svs_slide, f"hf-clip:{folder}", "out",
             ["tissue", "tiles", "embed", "zeroshot"])
    zs = SlideStore(tmp_path / "out" / r.slide_id, "r").read_zeroshot()
    assert zs is not None and zs.probs.shape[0] > 0
    np.testing.assert_allclose(zs.probs.sum(1), 1, atol=1e-4)
    assert (tmp_path / "out" / r.slide_id / "features" / "plip.h5").is_file()
