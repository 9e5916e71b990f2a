"""Batch outputs: ``OUT/index.html`` (a row per slide, linking its report) and
``OUT/summary.csv`` (manifest columns plus the key findings of each slide's report)."""

from __future__ import annotations

import csv
import os
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wsi_assist.files import read_json
from wsi_assist.report.data import NOTICE
from wsi_assist.report.markdown import fmt, pct

BASE_FIELDS = ["slide_id", "status", "error", "stage", "path", "n_tiles", "tiles_per_s",
               "tissue_area_mm2", "empty_tile_fraction", "top_class", "top_class_fraction"]

CSS = """body{font-family:"DejaVu Sans",Arial,sans-serif;margin:24px;color:#1f2328;font-size:14px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e3e6ea;padding:6px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}img{max-width:180px;max-height:140px;
border:1px solid #d0d7de}.failed{color:#b00020;font-weight:bold}.done{color:#1a7f37;
font-weight:bold}.notice{background:#fff8c5;border-left:6px solid #d4a72c;padding:6px 10px;
font-weight:bold}.err{color:#b00020;font-family:monospace;font-size:12px}"""


def key_findings(report: dict[str, Any] | None) -> dict[str, Any]:
    """Flat key findings of a report: QC, the top class, class fractions, scores."""
    if not report:
        return {}
    q = report.get("qc") or {}
    out: dict[str, Any] = {"tissue_area_mm2": q.get("tissue_area_mm2"),
                           "empty_tile_fraction": q.get("empty_tile_fraction")}
    comp = report.get("composition")
    if comp and comp.get("classes"):
        best = max(comp["classes"], key=lambda c: c.get("fraction") or 0)
        out["top_class"], out["top_class_fraction"] = best["name"], best.get("fraction")
        out.update({f"fraction:{c['name']}": c.get("fraction") for c in comp["classes"]})
    for m in report.get("submodels") or []:
        out.update({f"{m['name']}:{k}": v.get("value") for k, v in m["scores"].items()})
        out.update({f"{m['name']}:count:{k}": v for k, v in m["counts"].items()})
    return out


def _read_report(out: Path, slide_id: str) -> dict[str, Any] | None:
    if not slide_id:
        return None
    return read_json(out / slide_id / "report.json", left_out_of="the index")


def write_batch_outputs(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``out/index.html`` and ``out/summary.csv`` from manifest rows."""
    reports = {r["slide_id"]: _read_report(out, str(r.get("slide_id") or "")) for r in rows}
    findings = [key_findings(reports[r["slide_id"]]) for r in rows]
    extra = sorted({k for f in findings for k in f} - set(BASE_FIELDS))
    tmp = out / "summary.csv.part"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=BASE_FIELDS + extra, extrasaction="ignore")
        w.writeheader()
        for r, f in zip(rows, findings, strict=True):
            w.writerow({**{k: r.get(k, "") for k in BASE_FIELDS}, **{
                k: "" if v is None else v for k, v in f.items()}})
    os.replace(tmp, out / "summary.csv")
    body = "".join(_row(out, r, reports[r["slide_id"]], f)
                   for r, f in zip(rows, findings, strict=True))
    n_failed = sum(r.get("status") == "failed" for r in rows)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>wsi-assist batch</title><style>{CSS}</style></head><body>"
            f"<h1>wsi-assist batch: {len(rows)} slides, {n_failed} failed</h1>"
            f'<div class="notice">{escape(NOTICE)}.</div>'
            "<table><tr><th>Slide</th><th>Thumbnail</th><th>Status</th><th>Key findings</th>"
            f"</tr>{body}</table><p><a href=\"summary.csv\">summary.csv</a></p></body></html>\n")
    tmp = out / "index.html.part"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "index.html")


def _row(out: Path, r: dict[str, Any], report: dict[str, Any] | None,
         f: dict[str, Any]) -> str:
    sid = str(r.get("slide_id") or "")
    status = str(r.get("status") or "")
    href = quote(sid)
    thumb = next((p for p in ("overlays/classes.png", "thumbnail.png")
                  if sid and (out / sid / p).is_file()), None)
    img = f'<img src="{href}/{thumb}" alt="{escape(sid)}">' if thumb else ""
    name = (f'<a href="{href}/report.html">{escape(sid)}</a>' if report is not None
            else escape(sid))
    if status == "failed":
        info = (f'<div class="err">{escape(str(r.get("stage") or ""))}: '
                f"{escape(str(r.get('error') or ''))}</div>")
    else:
        items = [f"tissue {fmt(f.get('tissue_area_mm2'))} mm&sup2;",
                 f"{fmt(_int(r.get('n_tiles')))} tiles"]
        if f.get("top_class"):
            items.append(f"mostly {escape(str(f['top_class']))} "
                         f"({pct(f.get('top_class_fraction'))})")
        items += [f"{escape(k)} {fmt(v)}" for k, v in f.items()
                  if ":" in k and ":count:" not in k and not k.startswith("fraction:")]
        if report and report["slide"].get("synthetic"):
            items.append("<b>SYNTHETIC</b>")
        info = "<br>".join(items)
    return (f"<tr><td>{name}<br><span style=\"color:#57606a;font-size:12px\">"
            f"{escape(str(r.get('path') or ''))}</span></td><td>{img}</td>"
            f'<td class="{escape(status)}">{escape(status)}</td><td>{info}</td></tr>')


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
