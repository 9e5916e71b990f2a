"""``report.html``: one self-contained page (images inlined as data URIs, no scripts)."""

from __future__ import annotations

import base64
import logging
from html import escape
from pathlib import Path
from typing import Any

from wsi_assist.report.markdown import fmt, pct

log = logging.getLogger(__name__)

CSS = """
*{box-sizing:border-box}body{font-family:"DejaVu Sans","Helvetica Neue",Arial,sans-serif;
color:#1f2328;margin:0;background:#f4f5f7;font-size:14px;line-height:1.45}
main{max-width:1040px;margin:0 auto;padding:18px 24px 40px;background:#fff}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;border-bottom:2px solid #e3e6ea;
padding-bottom:4px;margin:26px 0 10px}h3{font-size:15px;margin:14px 0 6px}
.sub{color:#57606a;font-size:12px}
.notice{background:#fff8c5;border:1px solid #d4a72c;border-left:6px solid #d4a72c;
padding:8px 12px;font-weight:bold;margin:10px 0}
.synthetic{background:#b00020;color:#fff;font-weight:bold;text-align:center;padding:8px;
letter-spacing:2px;font-size:16px}
table{border-collapse:collapse;width:100%;margin:6px 0}
td,th{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.facts td:first-child{color:#57606a;width:34%}
.row{display:flex;gap:20px;align-items:flex-start}.row>div{flex:1;min-width:0}
img{max-width:100%;height:auto;border:1px solid #d0d7de}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:-1px;
margin-right:6px}
.bar{background:#eef0f3;height:12px;width:100%;min-width:120px}.bar>span{display:block;height:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
figure{margin:0}.gallery img{width:100%}
figcaption{font-size:12px;color:#333;margin-top:4px}
.muted{color:#57606a}.tag{display:inline-block;padding:0 6px;border-radius:8px;
font-size:11px;background:#ddf4ff;color:#0550ae}.tag.off{background:#eee;color:#666}
code{font-size:12px;word-break:break-all}
ul.keys{padding-left:18px;margin:4px 0}ul.keys li{margin:3px 0}
footer{margin-top:30px;font-size:11px;color:#57606a}
@media print{body{background:#fff}main{padding:0}section{break-inside:avoid}}
"""


def data_uri(path: Path) -> str | None:
    """A PNG/JPEG file as a base64 data URI, or None when it does not exist."""
    if not path.is_file():
        return None
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render(r: dict[str, Any], out_dir: Path) -> str:
    """The HTML page of report dict ``r``; pictures are read from ``out_dir``."""
    s = r["slide"]
    body = []
    if s["synthetic"]:
        body.append('<div class="synthetic">SYNTHETIC SLIDE: generated test data, not a '
                    "patient sample</div>")
    body.append(f"<main><h1>Draft slide report: {escape(s['slide_id'])}</h1>"
                f'<div class="sub">{escape(str(s["path"] or ""))} &middot; generated '
                f"{escape(r['provenance']['generated_at'])}</div>"
                f'<div class="notice">{escape(r["notice"])}.</div>')
    body += [_overview(r, out_dir), _composition(r, out_dir), _submodels(r),
             _gallery(r, out_dir), _summary(r), _stages(r), _provenance(r),
             (f"<footer>{escape(r['notice'])}. wsi-assist report schema "
              f"{escape(r['schema_version'])}.</footer></main>")]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(s['slide_id'])}: draft report</title><style>{CSS}</style>"
            "</head><body>" + "".join(b for b in body if b) + "</body></html>\n")


def _img(out_dir: Path, rel: str | None, alt: str) -> str:
    if not rel:
        return ""
    uri = data_uri(out_dir / rel)
    if uri is None:
        log.warning("%s: image %s missing; left out of report.html", out_dir, rel)
        return ""
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _overview(r: dict[str, Any], out_dir: Path) -> str:
    s, q = r["slide"], r["qc"]
    g = s["grid"]
    facts = [("Resolution", f"{fmt(s['mpp'])} &micro;m/px ({escape(str(s['mpp_source']))})"),
             ("Size", f"{fmt(s['width'])} &times; {fmt(s['height'])} px"),
             ("Scanner / format", escape(f"{s.get('vendor') or '-'} / "
                                         f"{s.get('format') or '-'}")),
             ("Tissue area", f"{fmt(q['tissue_area_mm2'])} mm&sup2;"),
             ("Tiles analysed", (f"{fmt(q['n_tiles'])} &times; {fmt(g.get('tile_px'))} px at "
                                 f"{fmt(g.get('delivered_mpp'))} &micro;m/px")),
             ("Empty tiles", (f"{pct(q['empty_tile_fraction'])} <span class=muted>"
                              f"({escape(q['empty_tile_definition'])})</span>"))]
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
    keys = "".join(f"<li>{k}</li>" for k in key_points(r))
    img = _img(out_dir, r["images"].get("overlay") or r["images"].get("thumbnail"),
               "Slide overview with tissue classes")
    return (f'<section><h2>Slide and quality control</h2><div class="row"><div>{img}</div>'
            f'<div><table class="facts">{rows}</table>'
            + (f'<h3>Key findings</h3><ul class="keys">{keys}</ul>' if keys else "")
            + "</div></div></section>")


def key_points(r: dict[str, Any]) -> list[str]:
    """Short HTML lines a reader looks at first: main classes, sub-model scores."""
    out = []
    c = r["composition"]
    if c is not None:
        main = sorted((x for x in c["classes"] if (x["fraction"] or 0) >= 0.05),
                      key=lambda x: -(x["fraction"] or 0))
        if main:
            out.append("Tissue classes: " + ", ".join(
                f'<span class="sw" style="background:{_rgb(x["color"])}"></span>'
                f"{escape(x['name'])} {pct(x['fraction'])}" for x in main[:4]))
    for m in r["submodels"]:
        for name, sc in m["scores"].items():
            out.append(f"{escape(name)}: <b>{fmt(sc['value'])}</b> "
                       f"<span class=muted>({escape(m['name'])})</span>")
        if m["counts"] and not m["scores"]:
            total = sum(m["counts"].values())
            out.append(f"{escape(m['name'])}: {fmt(total)} objects detected")
    not_run = [k for k, v in r["stages"].items() if v["status"] != "done"]
    if not_run:
        out.append("Not run: " + ", ".join(escape(k) for k in not_run))
    return out


def _composition(r: dict[str, Any], out_dir: Path) -> str:
    c = r["composition"]
    if c is None:
        return ('<section><h2>Tissue composition</h2><p class="muted">Not run: '
                "zero-shot classification did not run (see below).</p></section>")
    top = max((row["fraction"] or 0 for row in c["classes"]), default=0) or 1
    rows = []
    for row in sorted(c["classes"], key=lambda x: -(x["fraction"] or 0)):
        color = _rgb(row["color"])
        width = 100 * (row["fraction"] or 0) / top
        rows.append(f'<tr><td><span class="sw" style="background:{color}"></span>'
                    f"{escape(row['name'])}</td><td class=n>{fmt(row['n_tiles'])}</td>"
                    f"<td class=n>{pct(row['fraction'])}</td>"
                    f'<td><div class="bar"><span style="width:{width:.1f}%;'
                    f'background:{color}"></span></div></td>'
                    f"<td class=n>{fmt(row['region_area_mm2'])}</td>"
                    f"<td class=n>{pct(row['region_fraction'])}</td></tr>")
    heat = "".join(f"<figure>{_img(out_dir, rel, name + ' heatmap')}</figure>"
                   for name, rel in r["images"].get("heatmaps", {}).items())
    return ("<section><h2>Tissue composition (zero-shot)</h2>"
            f'<p class="sub">Prompt set <code>{escape(str(c["prompt_set"]))}</code>; '
            f"{fmt(c['n_uncertain'])} tiles uncertain (left out of regions). Regions: "
            "adjacent tiles of a class merged, small islands dropped, clipped to tissue.</p>"
            "<table><tr><th>Class</th><th class=n>Tiles</th><th class=n>Share of tiles</th>"
            "<th></th><th class=n>Region mm&sup2;</th>"
            "<th class=n>Of tissue</th></tr>" + "".join(rows) + "</table>"
            + (f'<h3>Heatmaps</h3><div class="grid">{heat}</div>' if heat else "")
            + "</section>")


def _submodels(r: dict[str, Any]) -> str:
    if not r["submodels"]:
        return ""
    parts = ["<section><h2>Sub-model findings</h2>"]
    for m in r["submodels"]:
        colors = dict(zip(m["classes"], m["colors"], strict=False))
        counts = "".join(
            f'<tr><td><span class="sw" style="background:{_rgb(colors.get(k))}"></span>'
            f"{escape(k)}</td><td class=n>{fmt(v)}</td></tr>" for k, v in m["counts"].items())
        scores = "".join(f"<tr><td><b>{escape(k)}</b></td><td class=n>{fmt(v['value'])}</td>"
                         f"<td class=muted>{escape(v['definition'])}</td></tr>"
                         for k, v in m["scores"].items())
        parts.append(f"<h3>{escape(m['name'])} <span class=tag>{escape(m['task'])}</span></h3>"
                     '<div class="row">'
                     + (f"<div><table><tr><th>Class</th><th class=n>Count</th></tr>{counts}"
                        "</table></div>" if counts else "")
                     + (f"<div><table><tr><th>Score</th><th class=n>Value</th><th>Definition"
                        f"</th></tr>{scores}</table></div>" if scores else "") + "</div>")
    return "".join(parts) + "</section>"


def _rgb(color: list[int] | tuple[int, ...] | None) -> str:
    r, g, b = (int(c) for c in (color or (200, 200, 200))[:3])
    return f"rgb({r},{g},{b})"


def _gallery(r: dict[str, Any], out_dir: Path) -> str:
    figs = []
    for t in r["representative_tiles"]:
        img = _img(out_dir, t.get("tile_png"), f"tile at {t.get('x')}, {t.get('y')}")
        cap = (f"<b>{escape(str(t.get('class', '-')))}</b> p={fmt(t.get('prob'))}<br>"
               f"<span class=muted>level-0 x={t.get('x')}, y={t.get('y')}</span>")
        if t.get("caption"):
            cap += f"<br>{escape(str(t['caption']))}"
        figs.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
    if not figs:
        return ""
    return ('<section><h2>Representative tiles</h2><div class="gallery">' + "".join(figs)
            + "</div></section>")


def _summary(r: dict[str, Any]) -> str:
    sm = r.get("summary")
    if not sm:
        return ""
    text = sm.get("summary") or sm.get("text") if isinstance(sm, dict) else sm
    return (f"<section><h2>Slide summary <span class=tag>model-generated</span></h2>"
            f"<p>{escape(str(text))}</p></section>")


def _stages(r: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td><span class=\"tag{'' if v['status'] == 'done' else ' off'}"
        f"\">{escape(v['status'])}</span></td><td class=muted>"
        f"{escape(v.get('how_to_enable', ''))}</td></tr>" for k, v in r["stages"].items())
    return ("<section><h2>Analysis stages</h2><table><tr><th>Stage</th><th>Status</th>"
            f"<th>How to enable</th></tr>{rows}</table></section>")


def _provenance(r: dict[str, Any]) -> str:
    p = r["provenance"]
    models = "".join(
        f"<tr><td>{escape(m['role'])}</td><td><code>{escape(str(m.get('model')))}</code></td>"
        f"<td><code>{escape(str(m.get('sha256') or m.get('prompt_sha256') or '-'))}</code>"
        "</td></tr>" for m in p["models"])
    pk = ", ".join(f"{escape(k)} {escape(v)}" for k, v in p["packages"].items())
    return ("<section><h2>Provenance</h2><table><tr><th>Role</th><th>Model</th>"
            f"<th>Checksum</th></tr>{models}</table>"
            f'<p class="sub">Config sha256 <code>{escape(p["config_sha256"])}</code> &middot; '
            f"packages: {pk}</p></section>")
