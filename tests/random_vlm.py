"""Random-weight LLaVA models saved in the real format (tests, benchmarks, demos).

``build_llava`` writes a folder that ``Captioner`` loads exactly as it loads a real
checkpoint: CLIP vision tower + Llama language model in a ``LlavaConfig``, a byte-level
BPE tokenizer trained here with the ``<image>`` token, a ``CLIPImageProcessor`` and a
``LlavaProcessor`` carrying a chat template. Nothing is downloaded.
"""

from __future__ import annotations

import json
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


def tokenizer(vocab: int = 320, image_token: bool = True,
              chat_template: str | None = CHAT_TEMPLATE, extra: tuple[str, ...] = (),
              add_bos: bool = False, named: dict[str, str] | None = None) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>, </s>, <pad>, <image> (unless
    ``image_token`` is false) and the ``extra`` special tokens; ``add_bos``: it prepends
    <s> to every text, as Llama/Mistral tokenizers do; ``named``: special tokens the
    tokenizer exposes as attributes (Gemma 3's boi_token, eoi_token, image_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<image>"] if image_token else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials + list(extra)
                                  + list((named or {}).values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 5, trainer)
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   **({"extra_special_tokens": named} if named else {}))
    more = (["<image>"] if image_token else []) + list(extra)
    if more:
        fast.add_special_tokens({"additional_special_tokens": more})
    if chat_template:
        fast.chat_template = chat_template
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

    tok = tokenizer(add_bos=True)  # llava-hf's Llama tokenizer prepends <s>
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


def build_clip_tower(out: Path, size: VlmSize = VlmSize(), seed: int = 2) -> Path:
    """A random CLIP in the released ``CLIPModel`` layout (openai/clip-vit-large-patch14-336:
    config.json with model_type "clip", ``vision_model.*``/``text_model.*`` keys in
    model.safetensors, preprocessor_config.json); LLaVA's ``mm_vision_tower``."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 64, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": size.vision_hidden,
                       "intermediate_size": 4 * size.vision_hidden,
                       "num_hidden_layers": size.vision_layers,
                       "num_attention_heads": size.vision_heads,
                       "image_size": size.image_px, "patch_size": size.patch_px},
        projection_dim=16)
    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in CLIPModel(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    doc = cfg.to_dict()
    doc["architectures"] = ["CLIPModel"]
    (out / "config.json").write_text(json.dumps(doc, indent=2))
    CLIPImageProcessor(size={"shortest_edge": size.image_px},
                       crop_size={"height": size.image_px, "width": size.image_px}
                       ).save_pretrained(out)
    return out


def build_original_llava(out: Path, tower: Path, kind: str = "llava_llama",
                         projector: str = "mlp2x_gelu", size: VlmSize = VlmSize(),
                         seed: int = 3, fmt: str = "bin", tower_in_checkpoint: bool = False
                         ) -> Path:
    """A random LLaVA in the haotian-liu/LLaVA release layout: config.json with
    model_type llava_llama/llava_mistral, LlavaLlamaForCausalLM, mm_* keys; weights in two
    shards (``pytorch_model-0000N-of-00002.bin`` or ``model-0000N-of-00002.safetensors``
    with an index) keyed ``model.embed_tokens.weight``, ``model.layers.N...``,
    ``model.mm_projector.{0,2}.weight`` (or ``model.mm_projector.weight``), ``lm_head.weight``
    and optionally ``model.vision_tower.vision_tower.vision_model...``; a tokenizer without
    ``<image>`` (the original code splices image features at id -200)."""
    import torch
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = tokenizer(image_token=False, chat_template=None, add_bos=True)
    base = llama_config(tok, size)
    if kind == "llava_mistral":
        base = MistralConfig(**{k: v for k, v in base.to_dict().items()
                                if k in MistralConfig().to_dict() and k != "model_type"},
                             sliding_window=None)
    torch.manual_seed(seed)
    lm = (MistralForCausalLM if kind == "llava_mistral" else LlamaForCausalLM)(base)
    sd = {k: v.contiguous() for k, v in lm.state_dict().items()}
    h, v = size.text_hidden, size.vision_hidden
    g = torch.Generator().manual_seed(seed + 1)
    if projector == "linear":
        sd["model.mm_projector.weight"] = torch.randn(h, v, generator=g) * 0.2
        sd["model.mm_projector.bias"] = torch.randn(h, generator=g) * 0.1
    else:
        sd["model.mm_projector.0.weight"] = torch.randn(h, v, generator=g) * 0.2
        sd["model.mm_projector.0.bias"] = torch.randn(h, generator=g) * 0.1
        sd["model.mm_projector.2.weight"] = torch.randn(h, h, generator=g) * 0.2
        sd["model.mm_projector.2.bias"] = torch.randn(h, generator=g) * 0.1
    if tower_in_checkpoint:  # an unfrozen tower, saved with the LLM (fine-tuned: perturbed)
        from safetensors.torch import load_file

        for k, t in load_file(str(tower / "model.safetensors")).items():
            if k.startswith("vision_model."):
                sd["model.vision_tower.vision_tower." + k] = t + 0.01
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    index: dict[str, str] = {}
    for i, part in enumerate(shards, 1):
        if fmt == "bin":
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, out / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, str(out / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, name))
    idx_name = ("pytorch_model.bin.index.json" if fmt == "bin"
                else "model.safetensors.index.json")
    (out / idx_name).write_text(json.dumps({"metadata": {"total_size": 0},
                                            "weight_map": index}, indent=2))
    cfg = {k: val for k, val in base.to_dict().items()
           if k not in ("rope_parameters", "dtype", "transformers_version")}
    cfg.update({
        "_name_or_path": "./checkpoints/vicuna-7b-v1.5",
        "architectures": ["LlavaMistralForCausalLM" if kind == "llava_mistral"
                          else "LlavaLlamaForCausalLM"],
        "model_type": kind, "rope_theta": 10000.0, "rope_scaling": None,
        "torch_dtype": "float32", "transformers_version": "4.31.0",
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad",
        "mm_hidden_size": v, "mm_projector_type": projector,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower), "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "use_mm_proj": True})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(out)
    return out


#: Qwen2.5-VL's chat template (as released, without tools and video)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_qwen25_vl(out: Path, size: VlmSize = VlmSize(), seed: int = 4) -> Path:
    """A random Qwen2.5-VL saved with save_pretrained: Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor with a Qwen2VLImageProcessor (patch 8, merge 2: a 32 px tile is 4
    image tokens), a BPE tokenizer with Qwen's special tokens and no BOS."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = tokenizer(image_token=False, chat_template=QWEN_TEMPLATE, extra=QWEN_TOKENS)
    tok.bos_token = None
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    h = size.text_hidden
    cfg = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": size.vision_hidden,
                       "intermediate_size": 2 * size.vision_hidden,
                       "num_heads": size.vision_heads, "patch_size": size.patch_px,
                       "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": h, "window_size": 2 * size.patch_px * 2,
                       "fullatt_block_indexes": [1]},
        text_config={"vocab_size": max(len(tok), size.vocab), "hidden_size": h,
                     "intermediate_size": size.text_intermediate,
                     "num_hidden_layers": size.text_layers,
                     "num_attention_heads": size.text_heads, "num_key_value_heads": 1,
                     "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [2, 3, 3]},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    px = size.image_px * size.image_px
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=size.patch_px, temporal_patch_size=2, merge_size=2,
            size={"shortest_edge": px, "longest_edge": px}),
        video_processor=Qwen2VLVideoProcessor(patch_size=size.patch_px, temporal_patch_size=2,
                                              merge_size=2),
        tokenizer=tok, chat_template=QWEN_TEMPLATE)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


#: Gemma 3's chat template (as released, text and images); it starts with the BOS token
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]"
    "['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text']"
    " -%}{%- set first = first + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == "
    "'assistant' else message['role'] -%}{{ '<start_of_turn>' + role + '\n' + "
    "(first if loop.first else '') }}{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == "
    "'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}{%- endif -%}")
GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>"}


def build_gemma3(out: Path, size: VlmSize = VlmSize(), seed: int = 5) -> Path:
    """A random Gemma 3 (MedGemma's architecture) saved with save_pretrained:
    Gemma3ForConditionalGeneration (SigLIP tower, 4 tokens per image), Gemma3Processor with
    a Gemma3ImageProcessor, a BPE tokenizer that adds BOS and names boi/eoi/image tokens."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = tokenizer(image_token=False, chat_template=GEMMA3_TEMPLATE, add_bos=True,
                    extra=("<start_of_turn>", "<end_of_turn>"), named=GEMMA3_NAMED)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in GEMMA3_NAMED.items()}
    cfg = Gemma3Config(
        text_config={"vocab_size": max(len(tok), size.vocab), "hidden_size": size.text_hidden,
                     "intermediate_size": size.text_intermediate,
                     "num_hidden_layers": size.text_layers,
                     "num_attention_heads": size.text_heads, "num_key_value_heads": 1,
                     "head_dim": 16, "sliding_window": 64, "max_position_embeddings": 4096,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": size.vision_hidden,
                       "intermediate_size": 2 * size.vision_hidden,
                       "num_hidden_layers": size.vision_layers,
                       "num_attention_heads": size.vision_heads,
                       "image_size": size.image_px, "patch_size": size.patch_px,
                       "vision_use_head": False},
        mm_tokens_per_image=4, boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"])
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": size.image_px,
                                                   "width": size.image_px}),
        tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out
