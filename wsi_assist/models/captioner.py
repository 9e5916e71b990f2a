"""Image-text-to-text captioning with transformers (LLaVA, LLaVA-NeXT, Qwen2-VL, ...).

The model and processor load from a local folder or a hub id through ``AutoProcessor`` and
``AutoModelForImageTextToText``; no remote code is ever executed. Prompts are rendered
with the processor's chat template; generation is batched with left padding and greedy
unless told otherwise. PathAsst appends its tools' outputs to the conversation; here each
tile's prompt carries that tile's findings (:func:`findings_text`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import ModelError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Caption:
    """One generated caption and the number of new tokens it took."""

    text: str
    n_tokens: int


def resolve_dtype(device: str, dtype: str = "auto") -> Any:
    """bf16 on CUDA when supported (else fp16), float32 on CPU; or the named dtype."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists() \
        or spec.count("/") > 1


def _supported(loader: Any) -> Mapping[str, str] | None:
    """model_type → class name of the auto model class ``loader`` (None: not a model)."""
    from transformers.models.auto import modeling_auto as ma

    return {"AutoModelForImageTextToText": ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
            "AutoModelForCausalLM": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            }.get(getattr(loader, "__name__", ""))


def check_architecture(spec: str, loader: Any, what: str) -> None:
    """For a local folder: ModelError when its config.json names an architecture
    ``loader`` cannot build (an original-layout LLaVA: how to convert it)."""
    from wsi_assist.models.llava_convert import original_llava_type

    path = Path(spec).expanduser()
    supported = _supported(loader)
    if supported is None or not (path / "config.json").is_file():
        return
    from wsi_assist.models.llava_convert import read_config

    cfg = read_config(path)
    kind = original_llava_type(cfg)
    if kind is not None:
        raise ModelError(
            f"{what} {spec!r} is an original-layout LLaVA checkpoint (model_type {kind!r}, "
            "haotian-liu/LLaVA); convert it first: wsi-assist models convert "
            f"{spec} -o CONVERTED [--vision-tower CLIP_FOLDER], then set {what} to CONVERTED")
    name = cfg.get("model_type") or next(iter(cfg.get("architectures") or []), None)
    if cfg.get("model_type") not in supported:
        raise ModelError(f"{what} {spec!r}: unrecognised architecture {name!r} in "
                         f"config.json; supported: {', '.join(sorted(supported))}")


def _names(keys: Any, n: int = 8) -> str:
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_pretrained(spec: str, loader: Any, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec)`` with a one-line ModelError on any failure.

    Models (auto model classes) load strictly: a recognised architecture, and no missing,
    unexpected or mismatched weights (never a silently half-random model)."""
    path = Path(spec).expanduser()
    if looks_local(spec) and not path.is_dir():
        raise ModelError(f"{what} {spec!r}: no such folder (expected a folder saved with "
                         "save_pretrained, or a hub id like 'org/name')")
    target = str(path) if path.is_dir() else spec
    strict = _supported(loader) is not None
    if strict:
        check_architecture(target, loader, what)
        kwargs["output_loading_info"] = True
    try:
        loaded = loader.from_pretrained(target, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unrecognized configuration class" in first or "does not recognize" in first:
            first = f"unrecognised architecture: {first}"
        raise ModelError(f"{what} {spec!r}: cannot load ({first})") from e
    if not strict:
        return loaded
    model, info = loaded
    problems = [f"{label} weights: {_names(info.get(key) or ())}"
                for key, label in (("missing_keys", "missing"),
                                   ("unexpected_keys", "unexpected"),
                                   ("mismatched_keys", "mismatched"))
                if info.get(key)]
    if problems:
        raise ModelError(f"{what} {spec!r}: the weights do not match "
                         f"{type(model).__name__} ({'; '.join(problems)})")
    return model


def load_processor(spec: str, what: str) -> Any:
    """The processor of ``spec``, with a chat template and a tokenizer (ModelError if not)."""
    from transformers import AutoProcessor

    processor = load_pretrained(spec, AutoProcessor, what)
    if not getattr(processor, "chat_template", None):
        raise ModelError(f"{what} {spec!r}: the processor has no chat template "
                         "(chat_template.jinja or processor_config.json)")
    if getattr(processor, "tokenizer", None) is None:
        raise ModelError(f"{what} {spec!r}: the processor has no tokenizer")
    return processor


class Captioner:
    """A loaded image-text-to-text model with its processor."""

    def __init__(self, spec: str, device: str = "cpu", dtype: str = "auto") -> None:
        from transformers import AutoModelForImageTextToText

        self.spec = spec
        self.device = device
        check_architecture(spec, AutoModelForImageTextToText, "caption.model")
        self.processor = load_processor(spec, "caption.model")
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        bos = tokenizer.bos_token_id
        #: the tokenizer adds BOS itself, so a template's leading BOS text is dropped
        self._bos_text = (tokenizer.bos_token if bos is not None and
                          tokenizer("x").input_ids[:1] == [bos] else None)
        self.model = load_pretrained(spec, AutoModelForImageTextToText, "caption.model",
                                     dtype=resolve_dtype(device, dtype))
        self.model.to(device).eval()
        log.info("captioner %s loaded on %s (%s)", spec, device, self.model.dtype)

    def render(self, prompt: str) -> str:
        """The chat-template text for one user turn of an image and ``prompt``."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        text = str(self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False))
        if self._bos_text and text.startswith(self._bos_text):
            text = text[len(self._bos_text):]  # else two BOS tokens (Gemma 3's template)
        return text

    def caption(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                max_new_tokens: int = 96, batch_size: int = 4,
                sampling: Mapping[str, Any] | None = None) -> list[Caption]:
        """Captions for RGB uint8 ``images``, one prompt each, ``batch_size`` at a time."""
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts differ in length: {len(images)} != "
                             f"{len(prompts)}")
        out: list[Caption] = []
        for start in range(0, len(images), batch_size):
            out += self._batch(images[start:start + batch_size],
                               prompts[start:start + batch_size], max_new_tokens, sampling)
        return out

    def _batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
               max_new_tokens: int, sampling: Mapping[str, Any] | None) -> list[Caption]:
        import torch
        from PIL import Image

        texts = [self.render(p) for p in prompts]
        pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        # one list of images per prompt: Gemma 3 (and others) read a flat list as all the
        # images of one prompt
        inputs = self.processor(images=[[im] for im in pil], text=texts, padding=True,
                                return_tensors="pt")
        inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point()
                      else v.to(self.device)) for k, v in inputs.items()}
        gen = {"do_sample": False, **(sampling or {})}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **gen)
        new = ids[:, inputs["input_ids"].shape[1]:].cpu()
        return [Caption(text=self._decode(row), n_tokens=self._count(row)) for row in new]

    def _decode(self, row: Any) -> str:
        return str(self.processor.tokenizer.decode(row, skip_special_tokens=True)).strip()

    def _count(self, row: Any) -> int:
        """New tokens up to and including the first end-of-sequence token."""
        tok = self.processor.tokenizer
        eos = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        ids = row.tolist()
        for i, t in enumerate(ids):
            if t in eos:
                return i + 1
        return len(ids)


def findings_text(findings: Mapping[str, Any]) -> str:
    """Render one tile's findings as lines a prompt can carry (PathAsst-style tool output).

    ``findings`` holds ``class``/``prob`` (zero-shot), optional ``second`` (runner-up
    class and prob), and ``submodels``: {name: {"counts": {cls: n}, "label": str,
    "prob": float}}.
    """
    lines = []
    if findings.get("class") is not None:
        line = (f"- Zero-shot tissue class: {findings['class']} "
                f"(probability {float(findings['prob']):.2f})")
        if findings.get("second"):
            name, p = findings["second"]
            line += f"; next: {name} ({float(p):.2f})"
        lines.append(line)
    for name, sub in (findings.get("submodels") or {}).items():
        parts = []
        if sub.get("label") is not None:
            parts.append(f"label {sub['label']} (probability {float(sub['prob']):.2f})")
        if sub.get("counts"):
            parts.append(", ".join(f"{k}: {v}" for k, v in sub["counts"].items()))
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) if lines else "- none available"


def build_prompt(template: str, findings: Mapping[str, Any]) -> str:
    """``template`` with ``{findings}`` replaced (appended when the template lacks it)."""
    text = findings_text(findings)
    if "{findings}" in template:
        return template.replace("{findings}", text)
    return f"{template}\nFindings from analysis tools for this tile:\n{text}"
