"""Batch outputs: ``OUT/index.html`` (a row per slide, linking its report) and
``OUT/summary.csv`` (manifest columns plus the key findings of each slide's report)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wsi_assist import files
from wsi_assist.report.data import NOTICE
from wsi_assist.report.html import environment

BASE_FIELDS = ["slide_id", "status", "error", "stage", "path", "n_tiles", "tiles_per_s",
               "warnings", "tissue_area_mm2", "empty_tile_fraction", "top_class",
               "top_class_fraction"]


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
    return files.read_json(out / slide_id / "report.json", left_out_of="the index")


def write_batch_outputs(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``out/index.html`` and ``out/summary.csv`` from manifest rows."""
    reports = {r["slide_id"]: _read_report(out, str(r.get("slide_id") or "")) for r in rows}
    findings = [key_findings(reports[r["slide_id"]]) for r in rows]
    extra = sorted({k for f in findings for k in f} - set(BASE_FIELDS))
    with files.atomic_open(out / "summary.csv", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=BASE_FIELDS + extra, extrasaction="ignore")
        w.writeheader()
        for r, f in zip(rows, findings, strict=True):
            w.writerow({**{k: r.get(k, "") for k in BASE_FIELDS}, **{
                k: "" if v is None else v for k, v in f.items()}})
    page = environment().get_template("index.html.j2").render(
        slides=[_row(out, r, reports[r["slide_id"]], f)
                for r, f in zip(rows, findings, strict=True)],
        n_failed=sum(r.get("status") == "failed" for r in rows), notice=NOTICE)
    files.write_text(out / "index.html", page)


def _row(out: Path, r: dict[str, Any], report: dict[str, Any] | None,
         f: dict[str, Any]) -> dict[str, Any]:
    """What the index shows of manifest row ``r``: names, links, findings ``f``."""
    sid = str(r.get("slide_id") or "")
    status, note = result(out, r)
    return {"sid": sid, "href": quote(sid), "linked": report is not None,
            "path": str(r.get("path") or ""), "status": status, "note": note,
            "thumb": next((p for p in ("overlays/classes.png", "thumbnail.png")
                           if sid and (out / sid / p).is_file()), None),
            "stage": str(r.get("stage") or ""), "error": str(r.get("error") or ""),
            "warnings": [w for w in str(r.get("warnings") or "").split("; ") if w],
            "tissue_area_mm2": f.get("tissue_area_mm2"), "n_tiles": _int(r.get("n_tiles")),
            "top_class": f.get("top_class"), "top_class_fraction": f.get("top_class_fraction"),
            "scores": [(k, v) for k, v in f.items() if v is not None
                       and ":" in k and ":count:" not in k and not k.startswith("fraction:")],
            "synthetic": bool(report and report["slide"].get("synthetic"))}


def result(out: Path, r: dict[str, Any]) -> tuple[str, str]:
    """A slide's result and a note: its manifest status, except that a slide this run
    skipped because it was already done is ``done`` (noted: by an earlier run)."""
    status, sid = str(r.get("status") or ""), str(r.get("slide_id") or "")
    if status == "skipped" and not r.get("error") and sid \
            and (out / sid / "done.json").is_file():
        return "done", "by an earlier run"
    if status == "skipped":
        return status, str(r.get("error") or "")
    return status, ""


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
