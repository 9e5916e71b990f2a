"""``report.html``: one self-contained page (images inlined as data URIs, no scripts), laid out
by the Jinja2 templates in ``templates/``; this module prepares the data."""

from __future__ import annotations

import base64
import functools
import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from wsi_assist.report.labels import (
    finding_label,
    na_reason,
    not_run_notes,
    score_label,
    score_value,
)
from wsi_assist.report.markdown import fmt, fmt_rgb, pct, stain_label

log = logging.getLogger(__name__)


@functools.cache
def environment() -> Environment:
    """The template environment of the report pages (one per process); every value is escaped."""
    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=fmt, pct=pct, rgb=_rgb, white=fmt_rgb, stain_label=stain_label,
                       score_label=score_label, score_value=score_value,
                       finding_label=finding_label, na_reason=na_reason)
    return env


def data_uri(path: Path) -> str | None:
    """A PNG/JPEG file as a base64 data URI, or None when it does not exist."""
    if not path.is_file():
        return None
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


#: Captions of a sub-model's pictures (``report.json`` submodels[].pictures).
PICTURE_TITLES = {"detections": "Detections on a sharp field (outlines coloured by class)",
                  "dab_heatmap": "Mean nuclear DAB OD per tile"}


def render(r: dict[str, Any], out_dir: Path) -> str:
    """The HTML page of report dict ``r``; pictures are read from ``out_dir``."""
    images = r["images"]
    classes = _by_share(r["composition"])
    top = max((x["fraction"] or 0 for x in classes), default=0) or 1
    return environment().get_template("report.html.j2").render(
        r=r, keys=key_points(r),
        overview=_uri(out_dir, images.get("overlay") or images.get("thumbnail")),
        classes=[(x, f"{100 * (x['fraction'] or 0) / top:.1f}") for x in classes],
        heatmaps=[(k, _uri(out_dir, v)) for k, v in images.get("heatmaps", {}).items()],
        submodels=[(m, dict(zip(m["classes"], m["colors"], strict=False)),
                    [(PICTURE_TITLES.get(k, k), _uri(out_dir, v))
                     for k, v in (m.get("pictures") or {}).items()])
                   for m in r["submodels"]],
        tiles=[(t, _uri(out_dir, t.get("tile_png"))) for t in r["representative_tiles"]],
        summary=_summary(r), not_run=not_run_notes(r["stages"]))


def key_points(r: dict[str, Any]) -> list[str]:
    """Short HTML lines a reader looks at first: main classes, sub-model scores."""
    points: list[dict[str, Any]] = []
    main = [x for x in _by_share(r["composition"]) if (x["fraction"] or 0) >= 0.05]
    if main:
        points.append({"kind": "classes", "classes": main[:4]})
    for m in r["submodels"]:
        # a score that does not apply to the slide is explained in its table, not here
        points += [{"kind": "score", "name": k, "value": v["value"], "model": m["name"],
                    "not_applicable": None}
                   for k, v in m["scores"].items() if not v.get("not_applicable")]
        if m["counts"] and not m["scores"]:
            points.append({"kind": "count", "model": m["name"],
                           "total": sum(m["counts"].values())})
    not_run = [k for k, v in r["stages"].items() if v["status"] != "done"]
    if not_run:
        points.append({"kind": "not_run", "stages": not_run})
    macros: Any = environment().get_template("macros.html.j2").module
    return [macros.key_point(p) for p in points]


def _by_share(c: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The classes of composition ``c``, largest share of tiles first."""
    return sorted(c["classes"] if c else [], key=lambda x: -(x["fraction"] or 0))


def _uri(out_dir: Path, rel: str | None) -> str | None:
    if not rel:
        return None
    uri = data_uri(out_dir / rel)
    if uri is None:
        log.warning("%s: image %s missing; left out of report.html", out_dir, rel)
    return uri


def _rgb(color: list[int] | tuple[int, ...] | None) -> str:
    r, g, b = (int(c) for c in (color or (200, 200, 200))[:3])
    return f"rgb({r},{g},{b})"


def _summary(r: dict[str, Any]) -> str | None:
    sm = r.get("summary")
    if not sm:
        return None
    return str(sm.get("summary") or sm.get("text") if isinstance(sm, dict) else sm)
