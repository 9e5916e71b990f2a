"""Random-weight LLaVA models saved in the real format (tests, benchmarks, demos).

``build_llava`` writes a folder that ``Captioner`` loads exactly as it loads a real
checkpoint: CLIP vision tower + Llama language model in a ``LlavaConfig``, a byte-level
BPE tokenizer trained here with the ``<image>`` token, a ``CLIPImageProcessor`` and a
``LlavaProcessor`` carrying a chat template. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
CORPUS = ("An H&E image of tumor tissue with nuclei, stroma, lymphocytes and necrosis. "
          "Zero-shot tissue class probability positive negative counts findings tile.")


@dataclass(frozen=True)
class VlmSize:
    """Layer sizes of a random LLaVA; the defaults make a model of about 0.1 M params.
    ``llava7b()`` gives the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-7B)."""

    image_px: int = 32
    patch_px: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 64
    vocab: int = 320

    def __post_init__(self) -> None:
        if self.image_px % self.patch_px:
            raise ValueError(f"image_px must be a multiple of patch_px, got {self.image_px!r}")
        if self.vocab < 300:
            raise ValueError(f"vocab must be >= 300 (byte alphabet + specials), got "
                             f"{self.vocab!r}")


def llava7b() -> VlmSize:
    """LLaVA-1.5-7B shapes (vision 1024x24 at 336/14, text 4096x32, vocab 32064)."""
    return VlmSize(image_px=336, patch_px=14, vision_hidden=1024, vision_layers=24,
                   vision_heads=16, text_hidden=4096, text_layers=32, text_heads=32,
                   text_intermediate=11008, vocab=32064)


def tokenizer(vocab: int = 320) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>, </s>, <pad>, <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>",
                                                                     "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(tok: Any, size: VlmSize) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=max(len(tok), size.vocab), hidden_size=size.text_hidden,
                       intermediate_size=size.text_intermediate,
                       num_hidden_layers=size.text_layers,
                       num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_heads, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)


def build_llava(out: Path, size: VlmSize = VlmSize(), seed: int = 0,
                dtype: str = "float32") -> Path:
    """Save a random LLaVA (model, processor, chat template) into ``out``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size.image_px},
            crop_size={"height": size.image_px, "width": size.image_px}),
        tokenizer=tok, patch_size=size.patch_px, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=size.vision_hidden,
                              intermediate_size=4 * size.vision_hidden,
                              num_hidden_layers=size.vision_layers,
                              num_attention_heads=size.vision_heads,
                              image_size=size.image_px, patch_size=size.patch_px)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(tok, size),
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device("cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_causal_lm(out: Path, size: VlmSize = VlmSize(), seed: int = 1) -> Path:
    """Save a random Llama causal LM with the same tokenizer (for summaries)."""
    import torch
    from transformers import LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(tok, size)).save_pretrained(out)
    tok.save_pretrained(out)
    return out
