"""``report.md``: the report as Markdown, pictures linked by relative path."""

from __future__ import annotations

from typing import Any

from wsi_assist.report.labels import (
    na_reason,
    not_run_notes,
    number,
    score_label,
    score_value,
)


def fmt(v: Any) -> str:
    """A number for people: ``-`` when missing, else :func:`labels.number` (no exponent)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return number(v)
    return str(v)


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def render(r: dict[str, Any]) -> str:
    """The Markdown text of report dict ``r``."""
    s, q = r["slide"], r["qc"]
    out = [f"# Draft slide report: {s['slide_id']}", "",
           f"> **{r['notice']}.**", ""]
    if s["synthetic"]:
        out += ["> **SYNTHETIC SLIDE**: generated test data, not a patient sample.", ""]
    out += [f"> **Warning: {w}.**\n" for w in q.get("warnings") or []]
    out += ["## Slide", "", "| | |", "|---|---|",
            f"| File | `{s['path']}` |",
            f"| Size | {fmt(s['width'])} x {fmt(s['height'])} px |",
            f"| Resolution | {fmt(s['mpp'])} µm/px ({s['mpp_source'] or 'unknown'}) |",
            *([f"| Channels | {', '.join(s['channels'])} (fluorescence / multichannel) |"]
              if s.get("layout") == "channels" else []),
            f"| Tiles | {fmt(q['n_tiles'])} at {fmt(s['grid'].get('target_mpp'))} µm/px |",
            f"| Tissue area | {fmt(q['tissue_area_mm2'])} mm² |",
            (f"| Empty tiles | {pct(q['empty_tile_fraction'])} "
             f"({q['empty_tile_definition']}) |"),
            f"| Image type | {stain_label(r.get('stain'))} |",
            (f"| Damaged tiles | {fmt(q.get('damaged_tiles'))} "
             f"({q.get('damaged_tile_definition') or 'not checked'}) |"), ""]
    out += _stain(r)
    out += _composition(r)
    out += _submodels(r)
    out += _gallery(r)
    if r.get("summary"):
        text = r["summary"].get("summary") or r["summary"].get("text") or r["summary"]
        out += ["## Slide summary (model-generated)", "", str(text), ""]
    out += _stages(r) + _provenance(r)
    return "\n".join(out) + "\n"


def stain_label(st: dict[str, Any] | None) -> str:
    """The kind of image and where its stain vectors came from, in plain words."""
    return "not found (run the 'tissue' stage)" if st is None else str(st["label"])


def _stain(r: dict[str, Any]) -> list[str]:
    st = r.get("stain")
    if not st or not st["stains"]:
        return []
    out = ["## Stain vectors", "",
           f"{st['label']}; background (white) {fmt_rgb(st['background'])}.", ""]
    if st.get("reason"):
        out += [f"Defaults used: {st['reason']}.", ""]
    out += ["| Stain | OD red | OD green | OD blue | Angle to QuPath's default |",
            "|---|---:|---:|---:|---:|"]
    for x in st["stains"]:
        red, green, blue = (f"{c:.3f}" for c in x["vector"])
        angle = x["angle_to_default_deg"]
        out.append(f"| {x['name']} | {red} | {green} | {blue} | "
                   f"{'-' if angle is None else f'{angle:.1f} deg'} |")
    return out + [""]


def fmt_rgb(v: list[float]) -> str:
    return " ".join(f"{c:.0f}" for c in v)


def _composition(r: dict[str, Any]) -> list[str]:
    c = r["composition"]
    if c is None:
        return ["## Tissue composition", "", "Not run (zero-shot classification).", ""]
    out = ["## Tissue composition", "",
           f"Prompt set `{c['prompt_set']}`; {fmt(c['n_uncertain'])} uncertain tiles.", "",
           "| Class | Tiles | Fraction of tiles | Region area mm² | Fraction of tissue |",
           "|---|---:|---:|---:|---:|"]
    for row in c["classes"]:
        out.append(f"| {row['name']} | {fmt(row['n_tiles'])} | {pct(row['fraction'])} | "
                   f"{fmt(row['region_area_mm2'])} | {pct(row['region_fraction'])} |")
    out.append("")
    if r["images"].get("overlay"):
        out += [f"![Tissue classes]({r['images']['overlay']})", ""]
    for name, rel in r["images"].get("heatmaps", {}).items():
        out += [f"![{name} heatmap]({rel})", ""]
    return out


def _submodels(r: dict[str, Any]) -> list[str]:
    out = ["## Sub-model findings", ""]
    if not r["submodels"]:
        return out + ["Not run.", ""]
    for m in r["submodels"]:
        out += [f"### {m['name']} ({m['task']})", ""]
        if m.get("skipped"):
            out += [f"Not run: {m['skipped']}", ""]
        if m.get("method"):
            out += [f"Method: {m['method']}.", ""]
        if m["counts"]:
            out += ["Counts: " + ", ".join(f"{k} {fmt(v)}" for k, v in m["counts"].items()),
                    ""]
        if m.get("intensity_counts"):
            out += ["Intensity classes: " + ", ".join(
                f"{k} {fmt(v)}" for k, v in m["intensity_counts"].items()), ""]
        for name, sc in m["scores"].items():
            value = (f"not applicable ({na_reason(sc['not_applicable'])})"
                     if sc["not_applicable"]
                     else score_value(name, sc["value"]))
            out.append(f"- **{score_label(name)}**: {value}. {sc['definition']}")
            out += _rules(sc)
        out.append("")
        for key, rel in (m.get("pictures") or {}).items():
            out += [f"![{m['name']} {key}]({rel})", ""]
        if m.get("parameters"):
            out += ["Parameters: " + ", ".join(f"{k} {fmt(v)}"
                                               for k, v in m["parameters"].items()), ""]
        if m.get("stains"):
            st = m["stains"]
            out += [f"Stains: {st.get('kind')} ({st.get('source')}): " + "; ".join(
                f"{n} " + ", ".join(f"{c:.3f}" for c in v)
                for n, v in zip(st.get("names", []), st.get("vectors", []), strict=False)), ""]
    return out


def _rules(sc: dict[str, Any]) -> list[str]:
    """A categorical score's rules (first met wins), the met one marked."""
    if not sc.get("rules"):
        return []
    judged = "; ".join(f"{c} {fmt(p)} %" for c, p in (sc.get("percent") or {}).items())
    out = [f"  - Rules, first met wins (judged on {judged}):" if judged
           else "  - Rules, first met wins:"]
    for i, r in enumerate(sc["rules"]):
        cond = " and ".join(r["when"]) or "otherwise"
        met = " **(met)**" if i == sc.get("met") else ""
        out.append(f"    - {r['category']}: {r['rule']} (`{cond}`){met}")
    return out


def _gallery(r: dict[str, Any]) -> list[str]:
    tiles = r["representative_tiles"]
    if not tiles:
        return []
    out = ["## Representative tiles", ""]
    for t in tiles:
        line = (f"- {t.get('class', '-')} (p = {fmt(t.get('prob'))}) at level-0 "
                f"x={t.get('x')}, y={t.get('y')}")
        if t.get("caption"):
            line += f": {t['caption']}"
        out.append(line)
    return out + [""]


def _stages(r: dict[str, Any]) -> list[str]:
    notes = not_run_notes(r["stages"])
    if not notes:
        return []
    return ["## Not run", "", *(f"- **{k}**: {text}." for k, text in notes.items()), ""]


def _provenance(r: dict[str, Any]) -> list[str]:
    p = r["provenance"]
    out = ["## Provenance", ""]
    for m in p["models"]:
        extra = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("role", "model") and v)
        out.append(f"- {m['role']}: `{m['model']}`" + (f" ({extra})" if extra else ""))
    out += [f"- device: {p.get('device') or 'not recorded'}",
            f"- config sha256: `{p['config_sha256']}`",
            f"- generated: {p['generated_at']}",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in p["packages"].items()),
            f"- report schema: {r['schema']} {r['schema_version']}"]
    return out
