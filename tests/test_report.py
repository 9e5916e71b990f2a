"""Draft reports from synthetic findings: report.json, Markdown, HTML (rendered in headless
Chromium), PDF, the `report` command, and the batch index."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from findings_helper import CLASSES, report_config, tiled_slide, write_findings
from PIL import Image
from typer.testing import CliRunner

from wsi_assist import config
from wsi_assist.aggregate import nice_length
from wsi_assist.cli import app
from wsi_assist.errors import ConfigError
from wsi_assist.report import html, pdf
from wsi_assist.report.index import write_batch_outputs
from wsi_assist.stages import rebuild_report
from wsi_assist.store import SlideStore

needs_chromium = pytest.mark.skipif(pdf.find_browser() is None,
                                    reason="chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory: pytest.TempPathFactory, svs_slide: Path, syn_spec) -> Path:
    """OUT with one slide tiled for real and synthetic findings stored, slide file gone."""
    src = tmp_path_factory.mktemp("slides") / "case-1.svs"
    shutil.copy(svs_slide, src)
    out = tmp_path_factory.mktemp("out")
    d = tiled_slide(out, src)
    write_findings(d, syn_spec.nuclei(), syn_spec.width)
    src.unlink()  # the report must not need the slide
    return out


@pytest.fixture(scope="module")
def slide_dir(batch_out: Path) -> Path:
    d = batch_out / "case-1"
    (batch_out / "config.yaml").write_text("report:\n  min_region_um2: 20000.0\n"
                                           "  pdf: true\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["report", str(d)])
    assert res.exit_code == 0, res.output
    return d


def test_report_json_from_stored_findings(slide_dir: Path, syn_spec) -> None:
    r = json.loads((slide_dir / "report.json").read_text(encoding="utf-8"))
    st = SlideStore(slide_dir, mode="r")
    grid, zs = st.read_grid(), st.read_zeroshot()
    assert zs is not None
    assert (r["schema"], r["schema_version"]) == ("wsi-assist/report", "1.1")
    assert r["notice"] == "Draft for research use; not a diagnosis"
    s = r["slide"]
    assert (s["mpp"], s["mpp_source"], s["synthetic"]) == (0.5, "metadata", True)
    assert (s["width"], s["height"]) == (2048, 1536) and s["grid"]["tile_px"] == 224
    q = r["qc"]
    frac = grid.tissue_fraction
    assert q["n_tiles"] == len(frac)
    assert q["empty_tile_fraction"] == pytest.approx((frac < 0.5).mean())
    assert q["tissue_area_mm2"] == pytest.approx(st.read_tissue().area_um2 / 1e6)
    comp = {c["name"]: c for c in r["composition"]["classes"]}
    top = zs.top
    assert [comp[c]["n_tiles"] for c in CLASSES] == [int((top == k).sum()) for k in range(4)]
    assert comp["Tumor"]["region_area_mm2"] > 0 and comp["Lymphocytes"]["n_tiles"] == 0
    assert r["composition"]["n_uncertain"] == 1
    ki67 = next(m for m in r["submodels"] if m["name"] == "ki67")
    n = len(syn_spec.nuclei())
    pos = ki67["counts"]["Ki-67 positive"]
    assert pos + ki67["counts"]["Ki-67 negative"] == n
    assert ki67["scores"]["Ki-67 index"]["value"] == pytest.approx(pos / n)
    assert "positive nuclei" in ki67["scores"]["Ki-67 index"]["definition"]
    tiles = r["representative_tiles"]
    assert next(t["caption"] for t in tiles).startswith("Test caption 0")
    assert tiles[0]["x"] == int(grid.coords[0, 0])
    assert r["summary"]["summary"].startswith("Synthetic tissue")
    assert all(v["status"] == "done" for v in r["stages"].values())
    p = r["provenance"]
    roles = {m["role"]: m for m in p["models"]}
    assert roles["zero-shot"]["prompt_sha256"] == "cd" * 32
    assert roles["sub-model ki67"]["sha256"] == "ef" * 32
    assert roles["captioner"]["model"] == "captioner-test"
    assert re.fullmatch(r"[0-9a-f]{16}", p["config_sha256"]) and p["packages"]["numpy"]
    assert r["images"]["heatmaps"] and all((slide_dir / v).is_file()
                                           for v in r["images"]["heatmaps"].values())
    assert r["annotations"]["n_features"] > n


def test_markdown_and_html_are_self_contained(slide_dir: Path) -> None:
    md = (slide_dir / "report.md").read_text(encoding="utf-8")
    assert "Draft for research use; not a diagnosis" in md and "SYNTHETIC SLIDE" in md
    assert "| Tumor |" in md and "Ki-67 index" in md
    html = (slide_dir / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "Draft for research use; not a diagnosis" in html and "SYNTHETIC SLIDE" in html


def test_stages_not_run_are_shown_with_how_to_enable(tmp_path: Path, svs_slide: Path) -> None:
    d = tiled_slide(tmp_path, svs_slide)  # tissue and tiles only
    SlideStore(d).mark_skipped("embed", "no PathCLIP weights configured; set models.pathclip")
    rebuild_report(d, report_config())
    r = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert r["stages"]["embed"] == {"status": "not run",
                                    "reason": "no PathCLIP weights configured; set "
                                              "models.pathclip",
                                    "how_to_enable": "no PathCLIP weights configured; set "
                                                     "models.pathclip"}
    assert r["stages"]["zeroshot"]["status"] == "not run"
    assert "zeroshot" in r["stages"]["zeroshot"]["how_to_enable"]
    assert r["composition"] is None and r["submodels"] == []
    html = (d / "report.html").read_text(encoding="utf-8")
    assert "set models.pathclip" in html and "not run" in html
    regions = [f for f in json.loads((d / "annotations.geojson").read_text())["features"]
               if f["properties"]["classification"]["name"] != "Tissue"]
    assert regions == []


def test_report_command_errors_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "no slide.zarr" in res.output


@needs_chromium
def test_html_renders_in_chromium_with_every_image(slide_dir: Path, tmp_path: Path) -> None:
    html_text = (slide_dir / "report.html").read_text(encoding="utf-8")
    probe = html_text.replace("<head>", "<head>" + PROBE, 1)
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    res = pdf.chromium(["--dump-dom", "--virtual-time-budget=10000"], page)
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout)
    assert found, res.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["images"] >= 5 and result["broken"] == 0 and result["errors"] == [], result
    shot = tmp_path / "report.png"
    pdf.chromium(["--window-size=1100,2600", f"--screenshot={shot}"], slide_dir / "report.html")
    img = np.asarray(Image.open(shot).convert("RGB"), np.int16)
    assert img.shape[:2] == (2600, 1100) and img.std() > 20  # not blank
    banner = img[5:30, 300:800].reshape(-1, 3).mean(axis=0)
    assert banner[0] > 150 and banner[1] < 60  # the red SYNTHETIC SLIDE banner
    data = (slide_dir / "report.pdf").read_bytes()
    assert data[:5] == b"%PDF-" and len(data) > 20_000
    # the overlay (over PRINT_JPEG_MIN_BYTES as PNG) is in the PDF as JPEG data, not in
    # report.html, and the page printed for it is gone
    assert (slide_dir / "overlays" / "classes.png").stat().st_size > html.PRINT_JPEG_MIN_BYTES
    assert b"/DCTDecode" in data and "data:image/jpeg" not in html_text
    assert not [p.name for p in slide_dir.iterdir() if p.name.startswith(".")]
    assert not list((slide_dir.parent / ".work").glob("**/*.html"))


def test_pdf_page_puts_large_pictures_in_as_jpeg(slide_dir: Path, tmp_path: Path) -> None:
    r = json.loads((slide_dir / "report.json").read_text(encoding="utf-8"))
    d = tmp_path / "slide"
    shutil.copytree(slide_dir, d)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (700, 600, 3), np.uint8)  # noise: a PNG of about 1.2 MB
    Image.fromarray(big).save(d / r["images"]["overlay"])
    assert (d / r["images"]["overlay"]).stat().st_size > html.PRINT_JPEG_MIN_BYTES

    def pictures(page: str) -> list[tuple[str, np.ndarray]]:
        found = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', page)
        return [(kind, np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), np.int16))
                for kind, b64 in found]

    shown, printed = pictures(html.render(r, d)), pictures(html.render(r, d, for_print=True))
    assert len(shown) == len(printed) >= 5 and {k for k, _ in shown} == {"png"}
    # the overlay alone is large enough; the small pictures stay PNG, pixel for pixel
    assert [k for k, _ in printed].count("jpeg") == 1
    for (ks, a), (kp, b) in zip(shown, printed, strict=True):
        assert a.shape[:2] == b.shape[:2]
        if kp == "png":
            assert np.array_equal(a, b)
        else:  # quality 90 without chroma subsampling, even on noise
            assert np.array_equal(a, big) and np.abs(a - b).mean() < 12


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(
  e.message || ("failed to load " + (e.target && e.target.tagName))), true);
const _err = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); _err(...a); };
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


def test_batch_index_and_summary(slide_dir: Path, batch_out: Path) -> None:
    rows = [{"path": "/x/case-1.svs", "slide_id": "case-1", "status": "done", "error": "",
             "stage": "", "n_tiles": "24", "seconds": "{}", "tiles_per_s": "10"},
            {"path": "/x/bad.svs", "slide_id": "bad", "status": "failed",
             "error": "bad.svs: not a <TIFF> file", "stage": "open", "n_tiles": "",
             "seconds": "{}", "tiles_per_s": ""}]
    write_batch_outputs(batch_out, rows)
    page = (batch_out / "index.html").read_text(encoding="utf-8")
    assert 'href="case-1/report.html"' in page and 'src="case-1/overlays/classes.png"' in page
    assert "not a &lt;TIFF&gt; file" in page and "mostly Tumor" in page
    with (batch_out / "summary.csv").open(newline="", encoding="utf-8") as f:
        got = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert got["bad"]["status"] == "failed" and got["bad"]["error"].startswith("bad.svs")
    r = json.loads((slide_dir / "report.json").read_text(encoding="utf-8"))
    assert float(got["case-1"]["ki67:Ki-67 index"]) == pytest.approx(
        r["submodels"][1]["scores"]["Ki-67 index"]["value"])
    assert got["case-1"]["top_class"] == "Tumor"


def test_html_escapes_slide_ids_captions_and_errors(slide_dir: Path, tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>'
    r = json.loads((slide_dir / "report.json").read_text(encoding="utf-8"))
    r["slide"]["slide_id"] = r["slide"]["path"] = evil
    r["representative_tiles"][0]["caption"] = evil
    r["composition"]["classes"][0]["name"] = evil
    r["summary"] = {"summary": evil}
    page = html.render(r, slide_dir)
    assert "<script" not in page and page.count("&lt;script&gt;alert(") >= 6
    assert any("&lt;script&gt;" in k for k in html.key_points(r))
    (tmp_path / "case-1").symlink_to(slide_dir)
    write_batch_outputs(tmp_path, [
        {"path": evil, "slide_id": "case-1", "status": "done", "n_tiles": "24"},
        {"path": "", "slide_id": evil, "status": "failed", "stage": "open", "error": evil}])
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script" not in index and index.count("&lt;script&gt;alert(") == 3


def test_report_config_validates() -> None:
    with pytest.raises(ConfigError, match=r"report\.min_region_um2"):
        config.from_dict({"report": {"min_region_um2": -1}})
    with pytest.raises(ConfigError, match=r"report\.heatmap_classes"):
        config.from_dict({"report": {"heatmap_classes": "Tumor"}})
    assert config.from_dict({"report": {"heatmap_classes": ["Tumor"]}}).report \
        .heatmap_classes == ("Tumor",)


@pytest.mark.parametrize(("um", "expect"), [(730, 500), (199, 100), (2500, 2000), (1, 1)])
def test_scale_bar_length(um: float, expect: float) -> None:
    assert nice_length(um) == expect


def test_run_with_report_stage_writes_index(tmp_path: Path, svs_slide: Path) -> None:
    """The stage inside `wsi-assist run`: per-slide reports plus OUT/index.html."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n", encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(svs_slide), "-o", str(out), "--config", str(cfg),
                                   "--stages", "tissue,tiles,report"])
    assert res.exit_code == 0, res.output
    d = out / svs_slide.stem
    r = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert r["stages"]["tiles"]["status"] == "done"
    assert r["stages"]["embed"]["status"] == "not run" and r["composition"] is None
    assert not (d / "report.pdf").exists()
    assert (d / "annotations.geojson").is_file() and (d / "overlays" / "classes.png").is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f'href="{svs_slide.stem}/report.html"' in page
    with (out / "summary.csv").open(newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "done" and float(row["tissue_area_mm2"]) > 0


def test_gallery_tiles_come_from_the_slide_when_present(tmp_path: Path, svs_slide: Path
                                                        ) -> None:
    from wsi_assist.report.images import save_tiles
    from wsi_assist.slide import open_slide

    picks = [{"x": 448, "y": 672, "size_l0": 224.0}]
    overview = np.zeros((96, 128, 3), np.uint8)  # black: a crop from it would be black
    save_tiles(tmp_path, picks, overview, 16.0, svs_slide, out_px=224)
    got = np.asarray(Image.open(tmp_path / picks[0]["tile_png"]).convert("RGB"), np.int16)
    with open_slide(svs_slide) as s:
        want = np.asarray(s.read_region((448, 672), 0, (224, 224)).convert("RGB"), np.int16)
    assert np.abs(got - want).mean() < 3
    save_tiles(tmp_path, picks, overview, 16.0, None, out_px=64)  # no slide: overview crop
    assert np.asarray(Image.open(tmp_path / picks[0]["tile_png"])).max() == 0


def test_nuclei_pictures_in_the_report(tmp_path: Path, svs_slide: Path) -> None:
    """The built-in nuclei get a picture of their outlines on a sharp field, coloured by
    class, shown in report.html; the DAB map exists only where DAB is scored."""
    from wsi_assist.batch import run_batch

    cfg = config.from_dict({"stages": ["tissue", "tiles", "submodels", "report"],
                            "report": {"pdf": False}, "parallelism": {"device": "cpu"}})
    res = run_batch([svs_slide], tmp_path / "out", cfg)
    assert res[0].status == "done", res[0].error
    d = tmp_path / "out" / res[0].slide_id
    r = json.loads((d / "report.json").read_text())
    nuclei = next(m for m in r["submodels"] if m["name"] == "nuclei")
    assert set(nuclei["pictures"]) == {"detections"}  # H&E: no DAB map
    img = np.asarray(Image.open(d / nuclei["pictures"]["detections"]).convert("RGB"))
    color = np.asarray(nuclei["colors"][0])
    assert (np.abs(img.astype(int) - color).sum(axis=2) == 0).sum() > 200  # outlines drawn
    assert "Detections on a sharp field" in (d / "report.html").read_text()


@pytest.mark.real_slides
def test_dab_map_on_the_real_ki67_crop(tmp_path: Path, shared_slides: Path) -> None:
    from wsi_assist.batch import run_batch

    cfg = config.from_dict({"stages": ["tissue", "tiles", "submodels", "report"],
                            "report": {"pdf": False}, "parallelism": {"device": "cpu"}})
    res = run_batch([shared_slides / "OS-2-vsi-Ki67.ome.tif"], tmp_path / "out", cfg)
    assert res[0].status == "done", res[0].error
    r = json.loads((tmp_path / "out" / res[0].slide_id / "report.json").read_text())
    nuclei = next(m for m in r["submodels"] if m["name"] == "nuclei")
    assert set(nuclei["pictures"]) == {"detections", "dab_heatmap"}
    assert nuclei["scores"]["positive_percent"]["value"] is not None


def test_labels_and_numbers_are_readable() -> None:
    from wsi_assist.report import labels

    assert labels.score_value("nucleus_density_per_mm2", 5753.2) == "5,753 nuclei/mm²"
    assert labels.score_label("nucleus_density_per_mm2") == "Nucleus density"
    assert labels.score_value("positive_percent", 16.83) == "16.8%"
    assert labels.score_label("tumour_cells_per_mm2") == "Tumour cells"
    assert labels.score_value("tumour_cells_per_mm2", 12.0) == "12.0 /mm²"
    assert labels.score_label("Ki-67 index") == "Ki-67 index"  # a spec's own name kept
    assert labels.finding_label("nuclei:h_score") == "nuclei: H-score"
    assert [labels.number(v) for v in (123456.7, 33.71, 0.4992, 2.0, 0.0)] == \
        ["123,457", "33.7", "0.499", "2", "0"]
    notes = labels.not_run_notes({
        "tiles": {"status": "done"},
        "embed": {"status": "not run", "reason": "no weights; set X",
                  "how_to_enable": "no weights; set X"},
        "zeroshot": {"status": "not run", "reason": "no weights; set X; needs prompts",
                     "how_to_enable": "no weights; set X; needs prompts"},
        "caption": {"status": "not run", "reason": "not in the run's stages",
                    "how_to_enable": "add 'caption' to stages"}})
    assert notes == {"embed": "no weights; set X", "zeroshot": "as for embed; needs prompts",
                     "caption": "not in the run's stages. To enable: add 'caption' to stages"}


def test_report_text_reads_as_words_and_the_picture_is_the_sharpest(
        tmp_path: Path, svs_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_assist.report.build import _sharpest
    from wsi_assist.store import Overview

    monkeypatch.delenv("WSI_ASSIST_PATHCLIP", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n", encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(svs_slide), "-o", str(out), "--config", str(cfg),
                                   "--stages", "tissue,tiles,submodels,report"])
    assert res.exit_code == 0, res.output
    d = out / svs_slide.stem
    md = (d / "report.md").read_text(encoding="utf-8")
    page = (d / "report.html").read_text(encoding="utf-8")
    index = (out / "index.html").read_text(encoding="utf-8")
    for text in (md, page, index):
        assert "nuclei/mm²" in text and "_per_mm2" not in text
        assert not re.search(r"\d\.\d+e[+-]\d", text), re.findall(r".{30}\de[+-]\d.{10}", text)
    assert "nuclei: Nucleus density: " in index
    # each stage's reason once: the PathCLIP sentence in embed's line, zeroshot refers to it
    assert md.count("no PathCLIP weights configured") == 1
    assert page.count("no PathCLIP weights configured") == 1 and "as for embed" in page
    assert md.count("no captioner configured") == 1
    r = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert r["provenance"]["device"] == json.loads((d / "done.json").read_text())["device"]
    keys = html.key_points(r)  # DAB scores of an H&E slide: in their table, not here
    assert any("Nucleus density: <b>" in k for k in keys)
    assert not any("not applicable" in k for k in keys)
    fine = Overview(np.zeros((40, 30, 3), np.uint8), 2.0)
    coarse = Overview(np.zeros((10, 8, 3), np.uint8), 8.0)
    assert _sharpest(coarse, fine) is fine and _sharpest(fine, coarse) is fine
    assert _sharpest(coarse, None) is coarse


def test_report_picture_is_read_from_the_slide_and_reused_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's slide picture is the tissue region read from the slide file at
    ``report.picture_px`` (the nearest pyramid level, never enlarged), not the coarse
    thumbnail; `wsi-assist report OUT` without the slide draws on the stored picture."""
    from wsi_assist.report.images import picture_bounds
    from wsi_assist.slide import open_slide
    from wsi_assist.synthetic import default_slide, write_slide

    monkeypatch.delenv("WSI_ASSIST_PATHCLIP", raising=False)
    src = write_slide(tmp_path / "big.svs", default_slide(4000, 3000, seed=3), kind="svs")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("outputs:\n  thumbnail_px: 512\nreport:\n  pdf: false\n  picture_px: 1200\n"
                   "  image_px: 600\n", encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(src), "-o", str(out), "--config", str(cfg),
                                   "--stages", "tissue,tiles,report"])
    assert res.exit_code == 0, res.output
    d = out / "big"
    st = SlideStore(d, mode="r")
    pic, thumb = st.read_report_picture(), st.read_thumbnail()
    assert pic is not None and thumb is not None
    assert max(pic.image.shape[:2]) == 1200 and pic.downsample < thumb.downsample
    # it covers the tissue and tiles, and shows what the slide shows there
    b = picture_bounds(st.read_tissue_geometry(), st.read_grid())
    assert b is not None
    x0, y0 = pic.origin
    h, w = pic.image.shape[:2]
    assert x0 <= b[0] and y0 <= b[1]
    assert x0 + w * pic.downsample >= b[2] - pic.downsample
    assert y0 + h * pic.downsample >= b[3] - pic.downsample
    with open_slide(src) as s:
        region = s.read_region((int(x0), int(y0)), 0, (round(w * pic.downsample),
                                                        round(h * pic.downsample)))
    want = np.asarray(region.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), np.int16)
    assert np.abs(pic.image.astype(np.int16) - want).mean() < 4
    # the overlay is drawn at the picture's size, not the thumbnail's
    drawn = np.asarray(Image.open(d / "overlays" / "classes.png").convert("RGB"))
    assert max(drawn.shape[:2]) > 1200
    # rebuilt without the slide: the stored picture, the same overlay
    src.unlink()
    rebuild_report(d, config.load(cfg))
    again = np.asarray(Image.open(d / "overlays" / "classes.png").convert("RGB"))
    assert again.shape == drawn.shape and np.array_equal(again, drawn)


def test_report_picture_uses_the_nearest_pyramid_level(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_assist import lowres, thumbnail
    from wsi_assist.slide import describe, open_slide
    from wsi_assist.synthetic import default_slide, write_slide

    src = write_slide(tmp_path / "p.svs", default_slide(4096, 3072, seed=1), kind="svs")
    info = describe(src, 0.5)
    assert info.level_downsamples[:2] == (1.0, 4.0)
    box = thumbnail.picture_box((500.0, 400.0, 3500.0, 2600.0), info.width, info.height)
    assert box[0] < 500 and box[2] > 3500 and box[2] <= info.width
    levels: list[int] = []
    real = lowres.open_units

    def spy(slide: object, level: int, *args: object) -> object:
        levels.append(level)
        return real(slide, level, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(lowres, "open_units", spy)
    with open_slide(src) as s:
        img, ds = thumbnail.read_picture(s, info, box, 300)  # 13x: level 1, then 3:1
        assert levels == [1] and max(img.shape[:2]) == 300
        assert ds == pytest.approx((box[2] - box[0]) / img.shape[1], rel=0.01)
        levels.clear()
        big, ds0 = thumbnail.read_picture(s, info, box, 10_000)  # never enlarged
        assert levels == [0] and ds0 == 1.0
        w, h = box[2] - box[0], box[3] - box[1]
        assert np.array_equal(big, s.read_region(box[:2], 0, (w, h), as_array=True)[..., :3])
        assert big.shape[:2] == (box[3] - box[1], box[2] - box[0])
