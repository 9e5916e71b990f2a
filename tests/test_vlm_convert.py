"""`wsi-assist models convert`: original-layout LLaVA (haotian-liu/LLaVA) checkpoints, built
here with random weights in the released key layout, converted to transformers LLaVA and
checked against a reference forward computed from the original tensors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from random_vlm import build_causal_lm, build_clip_tower, build_llava, build_original_llava

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from wsi_assist.errors import ModelError
from wsi_assist.models.captioner import Captioner
from wsi_assist.models.llava_convert import VICUNA_SYSTEM, convert

CASES = [("llava_llama", "mlp2x_gelu", "bin", False),
         ("llava_llama", "linear", "safetensors", False),
         ("llava_mistral", "mlp2x_gelu", "safetensors", True),
         ("llava_mistral", "linear", "bin", False)]


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip_tower(tmp_path_factory.mktemp("clip-tower"))


def _original_tensors(src: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for p in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(p)))
    for p in sorted(src.glob("pytorch_model-*.bin")):
        out.update(torch.load(p, weights_only=True))
    return out


def _reference_logits(src: Path, tower: Path, pixel_values: Any, input_ids: Any,
                      image_id: int) -> Any:
    """The original LLaVA forward, built from the original tensors without the converter:
    the CLIP tower's hidden_states[mm_vision_select_layer] minus CLS, the projector in
    plain torch ops, image features spliced at the image position, then the language model
    (LlamaForCausalLM / MistralForCausalLM, whose keys the original checkpoint uses)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    cfg = json.loads((src / "config.json").read_text())
    sd = _original_tensors(src)
    tcfg = json.loads((tower / "config.json").read_text())["vision_config"]
    vision = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in tcfg.items()
                                                 if k != "model_type"})).eval()
    tw = {k[len("vision_model."):]: v for k, v in load_file(str(tower / "model.safetensors"))
          .items() if k.startswith("vision_model.")}
    inner = "model.vision_tower.vision_tower.vision_model."
    tw.update({k[len(inner):]: v for k, v in sd.items() if k.startswith(inner)})
    names = set(vision.state_dict())
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
    vision.load_state_dict({prefix + k: v for k, v in tw.items()}, strict=True)
    lm_keys = {k: v for k, v in sd.items() if not k.startswith(("model.mm_projector",
                                                                "model.vision_tower"))}
    cls, ccls = ((MistralForCausalLM, MistralConfig) if cfg["model_type"] == "llava_mistral"
                 else (LlamaForCausalLM, LlamaConfig))
    keep = set(ccls().to_dict()) - {"model_type", "architectures", "transformers_version"}
    lm = cls(ccls(**{k: v for k, v in cfg.items() if k in keep and v is not None})).eval()
    lm.load_state_dict(lm_keys, strict=True)
    with torch.no_grad():
        feats = vision(pixel_values, output_hidden_states=True).hidden_states[
            cfg["mm_vision_select_layer"]][:, 1:]
        if cfg["mm_projector_type"] == "linear":
            proj = F.linear(feats, sd["model.mm_projector.weight"], sd["model.mm_projector.bias"])
        else:
            hid = F.gelu(F.linear(feats, sd["model.mm_projector.0.weight"],
                                  sd["model.mm_projector.0.bias"]))
            proj = F.linear(hid, sd["model.mm_projector.2.weight"],
                            sd["model.mm_projector.2.bias"])
        ids = input_ids[0]
        pos = (ids == image_id).nonzero().flatten()
        assert len(pos) == proj.shape[1] and bool((pos.diff() == 1).all())
        start = int(pos[0])
        embed = lm.get_input_embeddings()
        # the original: text before -200, the image features, text after
        seq = torch.cat([embed(ids[:start]), proj[0], embed(ids[start + len(pos):])], 0)
        return lm(inputs_embeds=seq[None]).logits


@pytest.mark.parametrize(("kind", "projector", "fmt", "tower_in_ckpt"), CASES)
def test_converted_logits_equal_original_forward(tmp_path: Path, tower: Path, kind: str,
                                                 projector: str, fmt: str,
                                                 tower_in_ckpt: bool) -> None:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src = build_original_llava(tmp_path / "orig", tower, kind=kind, projector=projector,
                               fmt=fmt, tower_in_checkpoint=tower_in_ckpt)
    keys = set(_original_tensors(src))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert ("model.mm_projector.weight" in keys) == (projector == "linear")
    assert ("model.mm_projector.2.weight" in keys) == (projector == "mlp2x_gelu")
    done = convert(src, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default"
    assert cfg["image_token_index"] == done.image_token_index
    assert cfg["text_config"]["model_type"] == kind.split("_")[1]
    assert cfg["projector_hidden_act"] == ("linear" if projector == "linear" else "gelu")

    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe the tumor."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[[img]], text=[text], return_tensors="pt")
    ids = inputs["input_ids"]
    n_patches = (32 // 8) ** 2
    assert int((ids == done.image_token_index).sum()) == n_patches
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = model(**inputs).logits
    want = _reference_logits(src, tower, inputs["pixel_values"], ids, done.image_token_index)
    vocab = want.shape[-1]
    diff = float((got[..., :vocab] - want).abs().max())
    print(f"\n{kind} {projector} {fmt} tower_in_ckpt={tower_in_ckpt}: max |logit diff| "
          f"{diff:.3g} over {tuple(want.shape)} (|logits| up to {float(want.abs().max()):.3g})")
    assert diff < 1e-5
    assert got.shape[-1] == done.vocab_size


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tower: Path) -> tuple[Path, Path]:
    src = build_original_llava(tmp_path_factory.mktemp("orig-llama"), tower)
    return src, tmp_path_factory.mktemp("conv")


def test_cli_convert_and_captioner_loads_it(converted: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from wsi_assist.cli import app

    src, dst = converted
    res = CliRunner().invoke(app, ["models", "convert", str(src), "-o", str(dst), "--force"])
    assert res.exit_code == 0, res.output
    assert "converted" in res.output and "vicuna_v1" in res.output
    again = CliRunner().invoke(app, ["models", "convert", str(src), "-o", str(dst)])
    assert again.exit_code == 2 and "--force" in again.output
    cap = Captioner(str(dst))
    rendered = cap.render("Describe.")
    assert rendered == f"{VICUNA_SYSTEM} USER: <image>\nDescribe. ASSISTANT:"
    tok = cap.processor.tokenizer
    ids = cap.processor(images=[[np.zeros((32, 32, 3), np.uint8)]], text=[rendered],
                        return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    imgs = [np.full((32, 32, 3), v, np.uint8) for v in (0, 90, 200)]
    out = cap.caption(imgs, ["a", "longer prompt here", "b"], max_new_tokens=3, batch_size=3)
    assert len(out) == 3 and all(isinstance(c.text, str) for c in out)


def test_original_layout_given_directly_says_convert(converted: tuple[Path, Path]) -> None:
    src, _ = converted
    with pytest.raises(ModelError, match="wsi-assist models convert") as e:
        Captioner(str(src))
    assert "chat template" not in str(e.value)


def test_convert_needs_a_local_vision_tower(tmp_path: Path, tower: Path) -> None:
    src = build_original_llava(tmp_path / "orig", tower)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not a local folder.*--vision-tower"):
        convert(src, tmp_path / "hf")
    convert(src, tmp_path / "hf", vision_tower=tower)  # the flag points at the folder
    assert (tmp_path / "hf" / "config.json").is_file()


def test_convert_unexpected_weight_is_named(tmp_path: Path, tower: Path) -> None:
    import torch

    src = build_original_llava(tmp_path / "orig", tower)
    torch.save({"model.extra_head.weight": torch.zeros(2)}, src / "pytorch_model-extra.bin")
    with pytest.raises(ModelError, match="model.extra_head.weight"):
        convert(src, tmp_path / "hf")


def _edit_safetensors(folder: Path, drop: str | None = None, add: str | None = None) -> str:
    """Remove the first key containing ``drop`` / add a key ``add``; returns the key."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    key = ""
    if drop:
        key = next(k for k in sd if drop in k)
        del sd[key]
    if add:
        key = add
        sd[add] = torch.zeros(3)
    save_file(sd, str(path), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("edit", ["drop", "add"])
def test_captioner_loads_strictly(tmp_path: Path, edit: str) -> None:
    folder = build_llava(tmp_path / "llava")
    key = _edit_safetensors(folder, drop="layers.1.mlp.up_proj" if edit == "drop" else None,
                            add="language_model.model.bogus.weight" if edit == "add" else None)
    with pytest.raises(ModelError, match=("missing" if edit == "drop" else "unexpected")
                       + " weights: .*" + key.split(".")[-3]):
        Captioner(str(folder))


def test_summary_lm_loads_strictly(tmp_path: Path) -> None:
    from wsi_assist.summary import llm_summary

    folder = build_causal_lm(tmp_path / "lm")
    _edit_safetensors(folder, drop="layers.0.self_attn.k_proj")
    with pytest.raises(ModelError, match="caption.summary_model.*missing weights: .*k_proj"):
        llm_summary(str(folder), "findings")


def test_unrecognised_architecture_is_named(tmp_path: Path) -> None:
    from wsi_assist.summary import llm_summary

    folder = build_llava(tmp_path / "llava")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "xyz"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unrecognised architecture 'xyz' in config.json; "
                                         "supported: .*llava"):
        Captioner(str(folder))
    lm = build_causal_lm(tmp_path / "lm")
    shutil.copy(folder / "config.json", lm / "config.json")
    with pytest.raises(ModelError, match="unrecognised architecture 'xyz'.*supported: .*llama"):
        llm_summary(str(lm), "findings")
