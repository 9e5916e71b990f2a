"""Words and numbers as a reader sees them: score names as labels with their units
("Nucleus density 5,753 nuclei/mm²", not ``nucleus_density_per_mm2 5.75e+03``), numbers
without exponents, and each stage's "not run" reason said once."""

from __future__ import annotations

import math
import re
from typing import Any

#: Labels and units of the built-in scores (stages/nuclei.py ``score_table``).
KNOWN_SCORES = {"nucleus_density_per_mm2": ("Nucleus density", "nuclei/mm²"),
                "median_nucleus_area_um2": ("Median nucleus area", "µm²"),
                "positive_percent": ("Positive", "%"),
                "h_score": ("H-score", "")}
#: Units read off the end of a snake_case score name, longest first.
SUFFIX_UNITS = (("_per_mm2", "/mm²"), ("_um2", "µm²"), ("_mm2", "mm²"), ("_percent", "%"),
                ("_pct", "%"), ("_um", "µm"), ("_mm", "mm"))


def number(v: float) -> str:
    """A float for people: thousands separated, about three significant digits, no
    exponent for values a report holds (5753.2 -> "5,753", 0.4992 -> "0.499")."""
    if not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    if a == 0 or a >= 1e-4:
        return f"{v:.3g}"
    return f"{v:.1e}"


def score_label(key: str) -> str:
    """A score's name as a label: known names from :data:`KNOWN_SCORES`, snake_case
    names in words without their unit suffix, other names (a spec's "Ki-67 index") kept."""
    if key in KNOWN_SCORES:
        return KNOWN_SCORES[key][0]
    if not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", key):
        return key
    for suffix, _ in SUFFIX_UNITS:
        if key.endswith(suffix):
            key = key[:-len(suffix)]
            break
    words = key.replace("_", " ")
    return words[:1].upper() + words[1:]


def score_unit(key: str) -> str:
    if key in KNOWN_SCORES:
        return KNOWN_SCORES[key][1]
    return next((unit for suffix, unit in SUFFIX_UNITS if key.endswith(suffix)), "")


def score_value(key: str, v: Any) -> str:
    """A score's value with its unit ("5,753 nuclei/mm²", "16.8%"); "-" when missing."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return "-" if v is None else str(v)
    text = f"{v:,}" if isinstance(v, int) else number(float(v))
    unit = score_unit(key)
    if not unit or text == "-":
        return text
    return f"{text}{unit}" if unit == "%" else f"{text} {unit}"


def na_reason(text: str) -> str:
    """Why a score does not apply, without a leading "not applicable:" (said beside it)."""
    return re.sub(r"^not applicable\s*[:,-]\s*", "", str(text), flags=re.IGNORECASE)


def finding_label(key: str) -> str:
    """An index/summary key ``<model>:<score>`` as "<model>: <label>"."""
    model, _, score = key.partition(":")
    return f"{model}: {score_label(score)}" if score else score_label(model)


def not_run_notes(stages: dict[str, dict[str, str]]) -> dict[str, str]:
    """Per stage not done: its reason and how to enable it, said once: "how to enable"
    only where it adds to the reason, and a reason an earlier stage gave already is
    referred to ("as for embed") instead of repeated."""
    out: dict[str, str] = {}
    said: dict[str, str] = {}  # a sentence -> the stage that said it
    for name, v in stages.items():
        if v.get("status") == "done":
            continue
        reason = str(v.get("reason") or "not run").rstrip(".")
        enable = str(v.get("how_to_enable") or "").rstrip(".")
        text = reason if not enable or enable in reason else f"{reason}. To enable: {enable}"
        before = next((t for t in said if text.startswith(t)), None)
        if before is None:
            said[text] = name
        else:
            text = f"as for {said[before]}{text[len(before):]}"
        out[name] = text
    return out
