"""Each supported captioner family, built as a tiny random model with save_pretrained in
its real layout with its real processor class, captions a batch of 4 exactly as one tile
at a time, with exactly one BOS (or none, for Qwen) at the start of the prompt."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from random_vlm import build_gemma3, build_llava, build_qwen25_vl

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from wsi_assist.models.captioner import Captioner

FAMILIES: dict[str, tuple[Callable[[Path], Path], str, str, str]] = {
    # name: builder, model_type, processor class, image processor class (prefix)
    "llava": (build_llava, "llava", "LlavaProcessor", "CLIPImageProcessor"),
    "qwen2_5_vl": (build_qwen25_vl, "qwen2_5_vl", "Qwen2_5_VLProcessor",
                   "Qwen2VLImageProcessor"),
    "gemma3": (build_gemma3, "gemma3", "Gemma3Processor", "Gemma3ImageProcessor"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path]:
    name = request.param
    return name, FAMILIES[name][0](tmp_path_factory.mktemp(name))


def _spy_generate(model: Any, calls: list[int]) -> None:
    orig = model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return orig(*args, **kwargs)

    model.generate = spy


def test_family_batches_like_single_with_one_bos(family: tuple[str, Path]) -> None:
    name, folder = family
    _, model_type, proc_cls, image_cls = FAMILIES[name]
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    cap = Captioner(str(folder), "cpu")
    assert type(cap.processor).__name__ == proc_cls
    assert type(cap.processor.image_processor).__name__.startswith(image_cls)
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (48, 40, 3), dtype=np.uint8) for _ in range(4)]
    prompts = ["short", "a much longer prompt about tumor nuclei and stroma", "mid prompt",
               "necrosis"]
    calls: list[int] = []
    _spy_generate(cap.model, calls)
    batched = cap.caption(imgs, prompts, max_new_tokens=4, batch_size=4)
    single = cap.caption(imgs, prompts, max_new_tokens=4, batch_size=1)
    assert calls == [4, 1, 1, 1, 1]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.n_tokens >= 1 for c in batched)

    tok = cap.processor.tokenizer
    rendered = cap.render("Describe.")
    ids = cap.processor(images=[[imgs[0]]], text=[rendered],
                        return_tensors="pt")["input_ids"][0].tolist()
    if tok.bos_token_id is None:  # Qwen uses none
        assert name == "qwen2_5_vl"
    else:
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1


def test_gemma3_needs_one_image_list_per_prompt(tmp_path: Path) -> None:
    """The failure the per-prompt lists fix, and the doubled BOS its template would give."""
    folder = build_gemma3(tmp_path / "gemma3")
    cap = Captioner(str(folder), "cpu")
    from PIL import Image
    pil = [Image.fromarray(np.zeros((32, 32, 3), np.uint8)) for _ in range(2)]
    texts = [cap.render(p) for p in ("a", "b")]
    with pytest.raises(ValueError, match="start_of_image"):
        cap.processor(images=pil, text=texts, padding=True, return_tensors="pt")
    raw = cap.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}],
        add_generation_prompt=True, tokenize=False)
    bos = cap.processor.tokenizer.bos_token
    assert raw.startswith(bos) and not texts[0].startswith(bos)
