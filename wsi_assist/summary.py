"""Slide-level draft summary from the stored findings and the tile captions.

Written by an optional text LLM (``AutoModelForCausalLM``, given all findings) or, when
none is configured, by a deterministic template. Always marked draft, with provenance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from wsi_assist.store import SlideStore

log = logging.getLogger(__name__)

DISCLAIMER = ("DRAFT generated automatically from model outputs; not a diagnosis. "
              "It must be reviewed and corrected by a pathologist.")


def collect_findings(store: SlideStore) -> dict[str, Any]:
    """Slide-level findings from the store: tiles, composition, sub-model counts/scores."""
    out: dict[str, Any] = {"n_tiles": len(store.read_grid()) if store.has_grid() else 0,
                           "mpp": store.read_slide().mpp}
    area = store.read_tissue().area_um2
    if area is not None:
        out["tissue_area_mm2"] = area / 1e6
    zs = store.read_zeroshot()
    if zs is not None:
        out["composition"] = zs.composition
        out["zeroshot_model"] = zs.model
    subs = store.read_submodels()
    if subs:
        out["submodels"] = {
            s.name: {"task": s.task, "counts": s.attrs.get("counts", {}),
                     "scores": {k: v.get("value") if isinstance(v, dict) else v
                                for k, v in (s.attrs.get("scores") or {}).items()},
                     "not_applicable": sorted(
                         k for k, v in (s.attrs.get("scores") or {}).items()
                         if isinstance(v, dict) and v.get("not_applicable"))}
            for s in subs}
    return out


def template_summary(findings: Mapping[str, Any], captions: Sequence[Mapping[str, Any]]
                     ) -> str:
    """A deterministic paragraph: tissue, composition, sub-model results, captions."""
    parts = [f"Draft summary. {findings.get('n_tiles', 0)} tissue tiles were analysed"]
    if findings.get("tissue_area_mm2") is not None:
        parts[0] += f" ({findings['tissue_area_mm2']:.1f} mm² of tissue)"
    parts[0] += "."
    comp = findings.get("composition") or {}
    if comp:
        ranked = sorted(comp.items(), key=lambda kv: -float(kv[1].get("fraction", 0)))
        parts.append("Zero-shot tissue composition: " + ", ".join(
            f"{name} {100 * float(v.get('fraction', 0)):.0f}%" for name, v in ranked) + ".")
    for name, sub in (findings.get("submodels") or {}).items():
        bits = [f"{k} {v}" for k, v in (sub.get("counts") or {}).items()]
        bits += [f"{k} = {v:.3g}" if isinstance(v, int | float) else f"{k} = {v}"
                 for k, v in (sub.get("scores") or {}).items() if v is not None]
        bits += [f"{k} not applicable" for k in sub.get("not_applicable") or ()]
        if bits:
            parts.append(f"{name}: " + ", ".join(bits) + ".")
    if captions:
        parts.append("Representative tiles: " + " ".join(
            f"[{c.get('class')}] {c.get('caption', '').strip()}" for c in captions
            if c.get("caption")))
    return " ".join(parts)


def llm_prompt(findings: Mapping[str, Any], captions: Sequence[Mapping[str, Any]]) -> str:
    """The instruction given to a text LLM: all findings and captions as JSON."""
    tiles = [{k: c.get(k) for k in ("x", "y", "class", "prob", "caption")} for c in captions]
    return ("You are drafting a pathology slide summary for a pathologist to review. "
            "Using only the findings and tile descriptions below, write one short "
            "paragraph. Do not invent findings and do not give a final diagnosis.\n"
            f"Slide findings: {json.dumps(findings, sort_keys=True, default=str)}\n"
            f"Tile descriptions: {json.dumps(tiles, default=str)}")


def llm_summary(spec: str, prompt: str, device: str = "cpu", max_new_tokens: int = 256
                ) -> str:
    """Greedy completion of ``prompt`` by the causal LM at ``spec`` (folder or hub id)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wsi_assist.models.captioner import load_pretrained, resolve_dtype

    tok = load_pretrained(spec, AutoTokenizer, "caption.summary_model")
    model = load_pretrained(spec, AutoModelForCausalLM, "caption.summary_model",
                            dtype=resolve_dtype(device)).to(device).eval()
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
    else:
        text = prompt + "\n\nSummary:"
    inputs = tok(text, return_tensors="pt").to(device)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return str(tok.decode(ids[0, inputs["input_ids"].shape[1]:],
                          skip_special_tokens=True)).strip()


def summary_doc(text: str, method: str, model: str | None, findings: Mapping[str, Any],
                n_captions: int, caption_model: str | None) -> dict[str, Any]:
    """The content of ``summary.json``: the draft text with its provenance."""
    return {"draft": True, "disclaimer": DISCLAIMER, "text": text,
            "provenance": {"method": method, "model": model, "caption_model": caption_model,
                           "n_captions": n_captions, "findings": dict(findings),
                           "created": datetime.now(UTC).isoformat(timespec="seconds")}}
