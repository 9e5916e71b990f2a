"""One Chromium per batch for the report PDFs (``report.browser``), and a slide whose
PDF fails never failing another."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi_assist.report import browser, pdf

needs_chromium = pytest.mark.skipif(pdf.find_browser() is None,
                                    reason="chromium not installed (apt-get install chromium)")


def pages(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"page{i}.html"
        p.write_text(f"<!doctype html><title>p{i}</title><body style='background:#fde'>"
                     f"<h1>Report {i}</h1>" + "<p>text</p>" * (20 * (i + 1)), "utf-8")
        out.append(p)
    return out


@needs_chromium
def test_one_browser_prints_every_page_and_cleans_up(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    b = pdf.batch_browser(scratch)
    assert b is not None
    htmls = pages(tmp_path / "html", 3)
    with browser.shared(b):
        assert browser.current() is b
        notes = [pdf.write_pdf(h, h.with_suffix(".pdf")) for h in htmls]
    assert browser.current() is None
    assert notes == ["written"] * 3 and b.starts == 1
    sizes = set()
    for h in htmls:
        data = h.with_suffix(".pdf").read_bytes()
        assert data[:5] == b"%PDF-" and b"%%EOF" in data[-64:]
        sizes.add(len(data))
    assert len(sizes) == 3  # three different documents, not one printed three times
    assert list(scratch.iterdir()) == []  # Chromium's profile and temp folder removed


@needs_chromium
def test_a_failing_page_restarts_the_browser_for_the_next(tmp_path: Path) -> None:
    b = pdf.batch_browser(tmp_path / "scratch")
    assert b is not None
    good = pages(tmp_path / "html", 1)[0]
    with browser.shared(b):
        with pytest.raises(browser.BrowserError, match="ERR_FILE_NOT_FOUND"):
            b.print_pdf(tmp_path / "missing.html", tmp_path / "missing.pdf")
        assert pdf.write_pdf(good, tmp_path / "good.pdf") == "written"
    assert b.starts == 2 and (tmp_path / "good.pdf").read_bytes()[:5] == b"%PDF-"


@needs_chromium
def test_broken_batch_browser_falls_back_to_one_chromium_per_page(tmp_path: Path) -> None:
    exe = pdf.find_browser()
    assert exe is not None
    broken = browser.Browser(str(tmp_path / "no-such-chromium"), pdf.FLAGS,
                             tmp_path / "scratch", pdf.CHROMIUM_DIRS)
    good = pages(tmp_path / "html", 1)[0]
    with browser.shared(broken):
        assert pdf.write_pdf(good, tmp_path / "out.pdf", tmp_path / "scratch") == "written"
    assert (tmp_path / "out.pdf").read_bytes()[:5] == b"%PDF-"


@needs_chromium
def test_batch_starts_one_chromium_for_all_slides(svs_slide: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_assist import batch, config

    made: list[browser.Browser] = []
    real = pdf.batch_browser

    def counting(scratch: Path) -> browser.Browser | None:
        b = real(scratch)
        if b is not None:
            made.append(b)
        return b

    monkeypatch.setattr(pdf, "batch_browser", counting)
    slides = []
    for name in ("a.svs", "b.svs"):
        shutil.copy(svs_slide, tmp_path / name)
        slides.append(tmp_path / name)
    cfg = config.from_dict({"stages": ["tissue", "tiles", "report"],
                            "report": {"pdf": True}})
    results = batch.run_batch(slides, tmp_path / "out", cfg)
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    assert len(made) == 1 and made[0].starts == 1
    for r in results:
        assert (tmp_path / "out" / r.slide_id / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (tmp_path / "out" / ".work").exists() or not any(
        (tmp_path / "out" / ".work").rglob(".chromium-*"))


@needs_chromium
def test_report_command_over_out_shares_one_chromium(svs_slide: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from wsi_assist import batch, config
    from wsi_assist.cli import app

    slides = []
    for name in ("a.svs", "b.svs"):
        shutil.copy(svs_slide, tmp_path / name)
        slides.append(tmp_path / name)
    out = tmp_path / "out"
    cfg = config.from_dict({"stages": ["tissue", "tiles"]})
    assert [r.status for r in batch.run_batch(slides, out, cfg)] == ["done", "done"]
    made: list[browser.Browser] = []
    real = pdf.batch_browser

    def counting(scratch: Path) -> browser.Browser | None:
        b = real(scratch)
        if b is not None:
            made.append(b)
        return b

    monkeypatch.setattr(pdf, "batch_browser", counting)
    res = CliRunner().invoke(app, ["report", str(out), "--pdf"])
    assert res.exit_code == 0, res.output
    assert res.output.count("pdf written") == 2
    assert len(made) == 1 and made[0].starts == 1
    assert not (out / ".work").exists()  # nothing left behind in OUT
