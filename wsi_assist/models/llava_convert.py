"""Convert an original-layout LLaVA checkpoint (haotian-liu/LLaVA) into a transformers
``LlavaForConditionalGeneration`` folder that :class:`~wsi_assist.models.captioner.Captioner`
loads like a llava-hf model. Offline only; weight files are read safely (safetensors, or
``torch.load(weights_only=True)``).

The source folder holds ``config.json`` (``model_type`` ``llava_llama`` or ``llava_mistral``,
``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``mm_hidden_size``, ...), weights with the language model's
keys (``model.embed_tokens.weight``, ``model.layers.N...``, ``lm_head.weight``), the
projector (``model.mm_projector.0.weight``, ...) and sometimes the vision tower
(``model.vision_tower.vision_tower.vision_model...``), and the tokenizer files. The CLIP
vision tower is a local folder (``CLIPModel`` or ``CLIPVisionModel`` layout with
``preprocessor_config.json``): ``mm_vision_tower`` when it names one, else ``--vision-tower``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wsi_assist.errors import ModelError

log = logging.getLogger(__name__)

ORIGINAL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llava_llama",
                          "LlavaMistralForCausalLM": "llava_mistral"}
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.")
_CONTENT = ("{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
            "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}"
            "{%- else -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}")
#: conv_vicuna_v1: "SYSTEM USER: <image>\\nPROMPT ASSISTANT: ANSWER</s>USER: ..."
VICUNA_V1 = (
    "{%- set ns = namespace(sys=" + json.dumps(VICUNA_SYSTEM) + ", first=true) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- set ns.sys = m['content'] if m['content'] is string else m['content'][0]['text'] -%}"
    "{%- endif -%}{%- endfor -%}{{ ns.sys }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{ (' ' if ns.first else '') + 'USER: ' }}" + _CONTENT +
    "{%- else -%}{{ ' ASSISTANT: ' }}" + _CONTENT + "{{ '</s>' }}{%- endif -%}"
    "{%- set ns.first = false -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}")
#: conv_mistral_instruct (LLAMA_2 style, no system): "[INST] <image>\\nPROMPT [/INST]"
MISTRAL_INSTRUCT = (
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' }}" + _CONTENT + "{{ ' [/INST]' }}"
    "{%- else -%}{{ ' ' }}" + _CONTENT + "{{ ' </s>' }}{%- endif -%}{%- endfor -%}")
TEMPLATES = {"vicuna_v1": VICUNA_V1, "mistral_instruct": MISTRAL_INSTRUCT}
DEFAULT_TEMPLATE = {"llava_llama": "vicuna_v1", "llava_mistral": "mistral_instruct"}
_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}


def original_llava_type(config: dict[str, Any]) -> str | None:
    """``llava_llama``/``llava_mistral`` when ``config`` is an original-layout LLaVA."""
    mt = config.get("model_type")
    if mt in ORIGINAL_TYPES:
        return str(mt)
    for arch in config.get("architectures") or []:
        if arch in ORIGINAL_ARCHITECTURES:
            return ORIGINAL_ARCHITECTURES[arch]
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ModelError when absent or not JSON."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors shards, else ``pytorch_model*.bin``."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found
    raise ModelError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")


def read_weights(files: Iterable[Path]) -> dict[str, Any]:
    """All tensors of ``files`` (safetensors, or torch pickles with weights_only=True)."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                part = load_file(str(path))
            else:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ModelError(f"{path}: cannot read weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
        if not isinstance(part, dict):
            raise ModelError(f"{path}: expected a dict of tensors, got {type(part).__name__}")
        out.update(part)
    return out


@dataclass(frozen=True)
class Converted:
    """What :func:`convert` wrote."""

    out: Path
    model_type: str
    projector: str
    template: str
    image_token_index: int
    vocab_size: int
    n_tensors: int


def _vision_tower_dir(src_cfg: dict[str, Any], src: Path, override: Path | None) -> Path:
    if override is not None:
        tower = override.expanduser()
    else:
        name = src_cfg.get("mm_vision_tower") or src_cfg.get("vision_tower")
        if not name:
            raise ModelError(f"{src}/config.json has no mm_vision_tower; pass --vision-tower")
        tower = Path(str(name)).expanduser()
        if not tower.is_absolute() and (src / tower).is_dir():
            tower = src / tower
        if not tower.is_dir():
            raise ModelError(f"mm_vision_tower {name!r} is not a local folder (nothing can be "
                             "downloaded); pass --vision-tower with a local CLIP folder (e.g. "
                             "a saved openai/clip-vit-large-patch14-336)")
    if not tower.is_dir():
        raise ModelError(f"vision tower {str(tower)!r}: no such folder")
    if not (tower / "preprocessor_config.json").is_file():
        raise ModelError(f"vision tower {str(tower)!r}: no preprocessor_config.json")
    return tower


def _vision_config(tower: Path) -> Any:
    from transformers import CLIPVisionConfig

    cfg = read_config(tower)
    if cfg.get("model_type") == "clip":
        cfg = dict(cfg.get("vision_config") or {})
    elif cfg.get("model_type") != "clip_vision_model":
        raise ModelError(f"vision tower {str(tower)!r}: model_type "
                         f"{cfg.get('model_type')!r}, expected 'clip' or 'clip_vision_model'")
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures",
                                                     "transformers_version")}
    return CLIPVisionConfig(**cfg)


def _text_config(src_cfg: dict[str, Any], base: str, vocab: int) -> Any:
    from transformers import LlamaConfig, MistralConfig

    cls = LlamaConfig if base == "llama" else MistralConfig
    keys = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}
    keys -= {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype"}
    kwargs = {k: v for k, v in src_cfg.items() if k in keys and v is not None}
    kwargs["vocab_size"] = vocab
    return cls(**kwargs)


def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return None


def map_state_dict(weights: dict[str, Any], tower: dict[str, Any], projector: str,
                   target_vision_keys: set[str]) -> dict[str, Any]:
    """Original LLaVA keys (plus the tower folder's) → ``LlavaForConditionalGeneration``
    keys as the module names them in memory (``model.language_model.*``,
    ``model.multi_modal_projector.linear_1.*``, ``model.vision_tower.*``, ``lm_head.*``).
    A tower inside the checkpoint (fine-tuned) replaces the tower folder's weights."""
    import torch

    vis_prefix = ("vision_model." if any(k.startswith("vision_model.")
                                         for k in target_vision_keys) else "")

    def vision_key(k: str) -> str:
        inner = k.removeprefix("vision_model.")
        return "model.vision_tower." + vis_prefix + inner

    out: dict[str, Any] = {}
    nested = {k[len("vision_model."):]: v for k, v in tower.items()
              if k.startswith("vision_model.")}
    flat = {k: v for k, v in tower.items() if not k.startswith(
        ("text_model.", "visual_projection", "text_projection", "logit_scale"))}
    for k, v in (nested or flat).items():
        out[vision_key(k)] = v
    proj: dict[str, Any] = {}
    unknown = []
    for k, v in weights.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older Llama code saved; recomputed from the config
        if (inner := _strip(k, ("model.vision_tower.vision_tower.",))) is not None:
            out[vision_key(inner)] = v
        elif (inner := _strip(k, ("model.mm_projector.",))) is not None:
            proj[inner] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif (inner := _strip(k, ("model.",))) is not None:
            out["model.language_model." + inner] = v
        else:
            unknown.append(k)
    if unknown:
        raise ModelError(f"unexpected weights in the checkpoint: {_names(unknown)}")
    pp = "model.multi_modal_projector."
    if projector == "linear":
        want = {"weight", "bias"}
        if set(proj) != want:
            raise ModelError(f"mm_projector_type 'linear' expects model.mm_projector.weight "
                             f"and .bias, found {_names(proj) or 'none'}")
        w = proj["weight"]
        out[pp + "linear_1.weight"], out[pp + "linear_1.bias"] = w, proj["bias"]
        # the transformers projector is linear_2(act(linear_1(x))): act = identity and
        # linear_2 = identity make it exactly the original single Linear
        out[pp + "linear_2.weight"] = torch.eye(w.shape[0], dtype=w.dtype)
        out[pp + "linear_2.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    else:
        want = {"0.weight", "0.bias", "2.weight", "2.bias"}
        if set(proj) != want:
            raise ModelError(f"mm_projector_type 'mlp2x_gelu' expects model.mm_projector."
                             f"{{0,2}}.{{weight,bias}}, found {_names(proj) or 'none'}")
        for i, name in (("0", "linear_1"), ("2", "linear_2")):
            out[f"{pp}{name}.weight"] = proj[f"{i}.weight"]
            out[f"{pp}{name}.bias"] = proj[f"{i}.bias"]
    return out


def _names(keys: Iterable[str], n: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _grow_vocab(sd: dict[str, Any], vocab: int) -> None:
    """Extend embed_tokens and lm_head to ``vocab`` rows with their mean row (the
    ``<image>`` row is never read as an input: image features replace it)."""
    import torch

    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = sd.get(key)
        if w is None or w.shape[0] >= vocab:
            continue
        extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab - w.shape[0], -1)
        sd[key] = torch.cat([w, extra], 0)


def convert(src: Path, dst: Path, vision_tower: Path | None = None,
            template: str | None = None, force: bool = False) -> Converted:
    """Write the transformers LLaVA folder ``dst`` converted from the original ``src``."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src, dst = src.expanduser(), dst.expanduser()
    if not src.is_dir():
        raise ModelError(f"{src}: no such folder")
    cfg = read_config(src)
    kind = original_llava_type(cfg)
    if kind is None:
        raise ModelError(f"{src}: not an original-layout LLaVA checkpoint (config.json "
                         f"model_type {cfg.get('model_type')!r}; expected one of "
                         f"{', '.join(ORIGINAL_TYPES)})")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise ModelError(f"{dst}: exists and is not empty (pass --force to overwrite)")
    projector = str(cfg.get("mm_projector_type", "linear"))
    if projector not in _PROJECTORS:
        raise ModelError(f"mm_projector_type {projector!r} is not supported; supported: "
                         f"{', '.join(_PROJECTORS)}")
    if cfg.get("mm_use_im_start_end"):
        raise ModelError("mm_use_im_start_end checkpoints (<im_start><image><im_end>) are "
                         "not supported")
    if str(cfg.get("image_aspect_ratio", "pad")) == "anyres" or cfg.get("mm_patch_merge_type",
                                                                         "flat") != "flat":
        raise ModelError("anyres / spatial_unpad checkpoints (LLaVA-NeXT) are not supported "
                         "by convert; use a llava-hf LLaVA-NeXT folder")
    select = str(cfg.get("mm_vision_select_feature", "patch"))
    if select not in ("patch", "cls_patch"):
        raise ModelError(f"mm_vision_select_feature {select!r} is not supported (patch, "
                         "cls_patch)")
    template = template or DEFAULT_TEMPLATE[kind]
    if template not in TEMPLATES:
        raise ModelError(f"template {template!r}: supported {', '.join(TEMPLATES)}")

    tower_dir = _vision_tower_dir(cfg, src, vision_tower)
    vision_cfg = _vision_config(tower_dir)
    if cfg.get("mm_hidden_size") not in (None, vision_cfg.hidden_size):
        raise ModelError(f"mm_hidden_size {cfg['mm_hidden_size']} differs from the vision "
                         f"tower's hidden_size {vision_cfg.hidden_size} ({tower_dir})")
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"{src}: cannot load the tokenizer ({str(e).splitlines()[0]})") from e
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]},
                               replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    if not isinstance(image_id, int):
        raise ModelError(f"{src}: the tokenizer cannot hold an <image> token")
    vocab = max(int(cfg.get("vocab_size", len(tok))), len(tok))
    text_cfg = _text_config(cfg, ORIGINAL_TYPES[kind], vocab)
    strategy: Literal["default", "full"] = "default" if select == "patch" else "full"
    n_patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    llava_cfg = LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_id,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy, projector_hidden_act=_PROJECTORS[projector],
        multimodal_projector_bias=True,
        image_seq_length=n_patches + (strategy == "full"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    weights = read_weights(weight_files(src))
    tower_weights = read_weights(weight_files(tower_dir))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_cfg)
    target = model.state_dict()
    vision_keys = {k[len("model.vision_tower."):] for k in target
                   if k.startswith("model.vision_tower.")}
    sd = map_state_dict(weights, tower_weights, projector, vision_keys)
    _grow_vocab(sd, vocab)
    if llava_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing = sorted(set(target) - set(sd) - ({"lm_head.weight"}
                                               if llava_cfg.tie_word_embeddings else set()))
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ModelError("the converted weights do not match LlavaForConditionalGeneration: "
                         + "; ".join(f"{what} {_names(keys)}" for what, keys in
                                     (("missing", missing), ("unexpected", unexpected))
                                     if keys))
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(target[k].shape)}" for k in target
           if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
    if bad:
        raise ModelError("weight shapes differ from the config: " + "; ".join(bad[:4]))
    dtype = next(iter(weights.values())).dtype
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=not llava_cfg.tie_word_embeddings, assign=True)
    if llava_cfg.tie_word_embeddings:
        model.tie_weights()
    image_processor = CLIPImageProcessor.from_pretrained(str(tower_dir))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                               patch_size=vision_cfg.patch_size,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1,
                               chat_template=TEMPLATES[template])
    dst.mkdir(parents=True, exist_ok=True)
    model.config.dtype = dtype
    model.save_pretrained(str(dst))
    processor.save_pretrained(str(dst))
    log.info("converted %s (%s, %s projector, %s template) into %s", src, kind, projector,
             template, dst)
    return Converted(out=dst, model_type=kind, projector=projector, template=template,
                     image_token_index=image_id, vocab_size=vocab, n_tensors=len(sd))

