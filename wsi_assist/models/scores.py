"""Slide scores from a sub-model's class counts, each stored with its definition.

Kinds (declared per spec, see :class:`~wsi_assist.models.submodel_spec.ScoreSpec`):
ratio and density; ``cps`` (PD-L1 combined positive score: positive tumour cells,
lymphocytes and macrophages over viable tumour cells x 100, capped at 100); ``hscore``
(1 x %1+ + 2 x %2+ + 3 x %3+ of the denominator cells, 0..300); ``categorical`` (e.g.
HER2 0 / 1+ / 2+ / 3+: the first declared rule whose conditions hold, with the rule text
kept beside the category). A score whose denominator is empty has no value and says why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from wsi_assist.models.submodel_spec import ScoreRule, ScoreSpec

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def evaluate(spec: ScoreSpec, counts: dict[str, int], analysed_mm2: float
             ) -> dict[str, Any]:
    """The stored form of one score: ``value`` (a number, or the category of a
    categorical score; None when it does not apply), ``definition``, ``kind``, and for
    scores that do not apply ``not_applicable`` (why)."""
    out: dict[str, Any] = {"kind": spec.kind, "definition": spec.definition}
    num = sum(counts.get(c, 0) for c in spec.numerator)
    den = sum(counts.get(c, 0) for c in spec.denominator)
    if spec.kind == "density":
        ok = analysed_mm2 > 0
        value: Any = num / analysed_mm2 * spec.scale if ok else None
        return _done(out, value, None if ok else "no tissue was analysed")
    if den == 0:
        return _done(out, None, f"no {' / '.join(spec.denominator)} cells counted")
    if spec.kind == "ratio":
        value = num / den * spec.scale
    elif spec.kind == "cps":
        value = num / den * 100.0
    elif spec.kind == "hscore":
        value = sum(w * counts.get(c, 0) for c, w in spec.weights) / den * 100.0
    else:
        return _categorical(out, spec, counts, den)
    cap = 100.0 if spec.kind == "cps" and spec.cap is None else spec.cap
    if cap is not None:
        value = min(value, cap)
    return _done(out, value, None)


def _done(out: dict[str, Any], value: Any, why: str | None) -> dict[str, Any]:
    out["value"] = value
    if why:
        out["not_applicable"] = why
    return out


def _categorical(out: dict[str, Any], spec: ScoreSpec, counts: dict[str, int], den: int
                 ) -> dict[str, Any]:
    def percent(classes: tuple[str, ...]) -> float:
        return 100.0 * sum(counts.get(c, 0) for c in classes) / den

    out["rules"] = [{"category": r.category, "rule": r.rule,
                     "when": [w.text() for w in r.when]} for r in spec.rules]
    out["percent"] = {" + ".join(w.classes): round(percent(w.classes), 3)
                      for r in spec.rules for w in r.when}
    met = next((i for i, r in enumerate(spec.rules)
                if all(_OPS[w.op](percent(w.classes), w.percent) for w in r.when)), None)
    if met is None:
        return _done(out, None, "no rule matched")
    match: ScoreRule = spec.rules[met]
    out["rule"], out["met"] = match.rule, met
    return _done(out, match.category, None)

