"""``report.html``: one self-contained page (images inlined as data URIs, no scripts), laid out
by the Jinja2 templates in ``templates/``; this module prepares the data."""

from __future__ import annotations

import base64
import functools
import io
import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from PIL import Image

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


#: PNG pictures over this many bytes go into the page printed to PDF as JPEG: Chromium
#: embeds JPEG data as it is but compresses PNG pixels anew (a 3.5 MB slide overlay took
#: 0.6 s of a page's 0.65 s, as JPEG 0.2 s, and the PDF was 4x larger). report.html
#: keeps the lossless PNG.
PRINT_JPEG_MIN_BYTES = 256_000
#: JPEG quality of those pictures; without chroma subsampling, so thin coloured outlines
#: keep their colour.
PRINT_JPEG_QUALITY = 90


def data_uri(path: Path, for_print: bool = False) -> str | None:
    """A PNG/JPEG file as a base64 data URI, or None when it does not exist;
    ``for_print``: a PNG over PRINT_JPEG_MIN_BYTES as JPEG, when that is smaller."""
    if not path.is_file():
        return None
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    data = path.read_bytes()
    if for_print and mime == "image/png" and len(data) > PRINT_JPEG_MIN_BYTES:
        jpeg = _as_jpeg(data)
        if len(jpeg) < len(data):
            mime, data = "image/jpeg", jpeg
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _as_jpeg(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=PRINT_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


#: Captions of a sub-model's pictures (``report.json`` submodels[].pictures).
PICTURE_TITLES = {"detections": "Detections on a sharp field (outlines coloured by class)",
                  "dab_heatmap": "Mean nuclear DAB OD per tile"}


def render(r: dict[str, Any], out_dir: Path, for_print: bool = False) -> str:
    """The HTML page of report dict ``r``; pictures are read from ``out_dir``.
    ``for_print``: the page printed to report.pdf (large PNG pictures as JPEG)."""
    images = r["images"]

    def _uri(rel: str | None) -> str | None:
        return _picture_uri(out_dir, rel, for_print)

    classes = _by_share(r["composition"])
    top = max((x["fraction"] or 0 for x in classes), default=0) or 1
    return environment().get_template("report.html.j2").render(
        r=r, keys=key_points(r),
        overview=_uri(images.get("overlay") or images.get("thumbnail")),
        classes=[(x, f"{100 * (x['fraction'] or 0) / top:.1f}") for x in classes],
        heatmaps=[(k, _uri(v)) for k, v in images.get("heatmaps", {}).items()],
        submodels=[(m, dict(zip(m["classes"], m["colors"], strict=False)),
                    [(PICTURE_TITLES.get(k, k), _uri(v))
                     for k, v in (m.get("pictures") or {}).items()])
                   for m in r["submodels"]],
        tiles=[(t, _uri(t.get("tile_png"))) for t in r["representative_tiles"]],
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


def _picture_uri(out_dir: Path, rel: str | None, for_print: bool = False) -> str | None:
    """The data URI of picture ``rel`` of ``out_dir`` (see :func:`data_uri`); None, and
    a warning, when it is missing."""
    if not rel:
        return None
    uri = data_uri(out_dir / rel, for_print)
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
