"""One Chromium per batch for the report PDFs (``report.browser``), and a slide whose
PDF fails never failing another."""

from __future__ import annotations

import json
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


def batch_browser(tmp_path: Path) -> browser.Browser:
    """The batch's browser, its scratch folder ``tmp_path / "scratch"``."""
    b = pdf.batch_browser(tmp_path / "scratch")
    assert b is not None
    return b


def warm_up(b: browser.Browser) -> None:
    """Start ``b`` in the background and wait until it is up (or has failed)."""
    started = b.warm()
    assert started is not None
    started.join(60)


def broken_browser(tmp_path: Path) -> browser.Browser:
    """A batch browser whose executable does not exist."""
    return browser.Browser(str(tmp_path / "no-such-chromium"), pdf.FLAGS,
                           tmp_path / "scratch", pdf.CHROMIUM_DIRS)


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
    b = batch_browser(tmp_path)
    good = pages(tmp_path / "html", 1)[0]
    with browser.shared(b):
        with pytest.raises(browser.BrowserError, match="ERR_FILE_NOT_FOUND"):
            b.print_pdf(tmp_path / "missing.html", tmp_path / "missing.pdf")
        assert pdf.write_pdf(good, tmp_path / "good.pdf") == "written"
    assert b.starts == 2 and (tmp_path / "good.pdf").read_bytes()[:5] == b"%PDF-"


@needs_chromium
@pytest.mark.parametrize("warmed", [False, True], ids=["page", "failed-warm-up"])
def test_broken_batch_browser_falls_back_to_one_chromium_per_page(tmp_path: Path,
                                                                   warmed: bool) -> None:
    # a batch browser that cannot start, at the first page or at a warm-up before it
    assert pdf.find_browser() is not None
    broken = broken_browser(tmp_path)
    good = pages(tmp_path / "html", 1)[0]
    with browser.shared(broken):
        if warmed:
            warm_up(broken)
        assert pdf.write_pdf(good, tmp_path / "out.pdf", tmp_path / "scratch") == "written"
    assert (tmp_path / "out.pdf").read_bytes()[:5] == b"%PDF-"


@needs_chromium
def test_warm_starts_chromium_before_the_first_page(tmp_path: Path) -> None:
    b = batch_browser(tmp_path)
    html = pages(tmp_path / "html", 1)[0]
    with browser.shared(b):
        warm_up(b)
        assert b.starts == 1 and b.warm() is None  # running, attached before any page
        assert pdf.write_pdf(html, html.with_suffix(".pdf")) == "written"
    assert b.starts == 1 and html.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert list((tmp_path / "scratch").iterdir()) == []


def test_no_warm_up_after_the_batch_shut_its_browser_down(tmp_path: Path) -> None:
    # a slide still running on a Dask worker after Ctrl-C ended the batch
    b = broken_browser(tmp_path)
    b.shutdown()
    with browser.using(b):
        browser.warm_current()
    assert b.warm() is None and b.starts == 0 and not (tmp_path / "scratch").exists()


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


# --- Chromium in its own session; one Chromium per Dask worker process ---------------------

def counting_chromium(folder: Path, log: Path) -> Path:
    """A ``chromium`` first on PATH that logs its start (pid, parent pid, process group)
    to ``log`` and then is the real Chromium (``exec``: the same process)."""
    real = pdf.find_browser()
    assert real is not None
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "chromium"
    exe.write_text(f'#!/bin/sh\necho "$$ $PPID $(ps -o pgid= -p $$ | tr -d " ")" >> {log}\n'
                   f'exec {real} "$@"\n')
    exe.chmod(0o755)
    return folder


def starts(log: Path) -> list[tuple[int, int, int]]:
    if not log.is_file():
        return []
    return [(int(a), int(b), int(c)) for a, b, c in
            (line.split() for line in log.read_text().splitlines())]


def group_gone(pgid: int, wait: float = 10.0) -> bool:
    import os
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@needs_chromium
def test_chromium_runs_in_a_session_of_its_own_and_is_gone_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground process group) must not reach
    Chromium: both the one-shot Chromium and the batch's run in their own group, and
    nothing of them is left running once the PDF is written or the browser closed."""
    import os

    log = tmp_path / "starts.log"
    monkeypatch.setenv("PATH", f"{counting_chromium(tmp_path / 'bin', log)}:"
                               f"{os.environ['PATH']}")
    html = pages(tmp_path / "html", 2)
    assert pdf.write_pdf(html[0], tmp_path / "one.pdf") == "written"  # Chromium once
    b = batch_browser(tmp_path)
    with browser.shared(b):
        assert pdf.write_pdf(html[1], tmp_path / "two.pdf") == "written"
    got = starts(log)
    assert len(got) == 2
    for pid, _parent, pgid in got:
        assert pgid == pid and pgid != os.getpgrp()  # a session (and group) of its own
        assert group_gone(pgid), f"chromium group {pgid} still running"


@needs_chromium
def test_one_shot_chromium_is_killed_on_interrupt(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt while the one-shot Chromium prints: its whole group is killed."""
    import subprocess

    real_popen = subprocess.Popen
    seen: list[int] = []

    class Interrupted(real_popen):  # type: ignore[misc,valid-type]
        def communicate(self, *a: object, **k: object) -> tuple[str, str]:
            seen.append(self.pid)
            raise KeyboardInterrupt

    monkeypatch.setattr(pdf.subprocess, "Popen", Interrupted)
    html = pages(tmp_path / "html", 1)[0]
    with pytest.raises(KeyboardInterrupt):
        pdf.write_pdf(html, tmp_path / "x.pdf")
    assert len(seen) == 1 and group_gone(seen[0])
    assert not (tmp_path / "x.pdf").exists()
    assert not [p for p in (tmp_path / "html").iterdir() if p.name.startswith(".chromium")]


@needs_chromium
def test_dask_workers_start_one_chromium_each_not_one_per_slide(
        svs_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers/--scheduler: each worker process prints all its slides' PDFs with one
    Chromium (counted by a logging ``chromium`` on PATH), stopped at the end of the batch;
    the local workers ignore SIGINT."""
    import os
    import signal

    from dask.distributed import Client, LocalCluster

    from wsi_assist import batch, config

    log = tmp_path / "starts.log"
    monkeypatch.setenv("PATH", f"{counting_chromium(tmp_path / 'bin', log)}:"
                               f"{os.environ['PATH']}")
    slides = []
    for i in range(4):
        shutil.copy(svs_slide, tmp_path / f"s{i}.svs")
        slides.append(tmp_path / f"s{i}.svs")
    cfg = config.from_dict({"stages": ["tissue", "tiles", "report"], "report": {"pdf": True},
                            "parallelism": {"workers": 2}})
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, local_directory=str(tmp_path / "dask")
                      ) as cluster, Client(cluster) as client:
        batch.quiet_local_workers(client)
        handlers = client.run(lambda: int(signal.getsignal(signal.SIGINT)))
        assert set(handlers.values()) == {int(signal.SIG_IGN)}
        results = batch.run_batch(slides, out, cfg, client=client)
        assert [r.status for r in results] == ["done"] * 4, [r.error for r in results]
        worker_pids = set(client.run(os.getpid).values())
    for r in results:
        assert (out / r.slide_id / "report.pdf").read_bytes()[:5] == b"%PDF-"
    got = starts(log)
    printed_by = {parent for _pid, parent, _pgid in got}
    assert printed_by <= worker_pids
    assert len(got) == len(printed_by) <= 2, got  # one per worker process, not 4
    assert all(group_gone(pgid) for _pid, _parent, pgid in got)  # stopped at the end
    assert not list(out.rglob(".chromium-*"))


@needs_chromium
@pytest.mark.parametrize("mode", ["local", "workers"])
def test_ctrl_c_to_the_process_group_keeps_finished_pdfs(
        svs_slide: Path, tmp_path: Path, mode: str) -> None:
    """``wsi-assist run`` in a terminal: Ctrl-C sends SIGINT to the whole process group
    (os.killpg), Chromium and local Dask workers included. The run stops after the
    slides in progress; every slide it reports done has its PDF; the manifest and the
    index are written."""
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    slides = []
    for i in range(5):
        shutil.copy(svs_slide, tmp_path / f"s{i}.svs")
        slides.append(str(tmp_path / f"s{i}.svs"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    extra = ["--workers", "2"] if mode == "workers" else []
    proc = subprocess.Popen([sys.executable, "-m", "wsi_assist", "run", *slides, "-o",
                             str(out), "--stages", "tissue,tiles,report", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # the "terminal's" group
    deadline = time.monotonic() + 240
    while not list(out.glob("*/report.pdf")) and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    with (out / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    done = [r for r in rows if r["status"] == "done"]
    assert done, rows
    assert not [r for r in rows if r["status"] == "failed"], rows  # one Ctrl-C drops none
    for r in done:
        folder = out / r["slide_id"]
        assert (folder / "report.pdf").read_bytes()[:5] == b"%PDF-", r
        assert json.loads((folder / "done.json").read_text())["summary"]["report"][
            "pdf"] == "written"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f">{r['slide_id']}<" in page for r in done)
    assert not list(out.rglob(".chromium-*"))


@needs_chromium
@pytest.mark.parametrize("how", ["exit", "killed"])
def test_the_batch_chromium_ends_with_the_process(tmp_path: Path, how: str) -> None:
    """A process that ends without closing its browser (a normal exit; SIGKILL) leaves no
    Chromium running: atexit closes it (and removes its folder); else it exits when its
    pipe closes."""
    import os
    import subprocess
    import sys

    html = pages(tmp_path / "html", 1)[0]
    scratch = tmp_path / "scratch"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from wsi_assist.report import pdf\n"
        f"b = pdf.batch_browser(Path({str(scratch)!r}))\n"
        f"b.print_pdf(Path({str(html)!r}), Path({str(tmp_path / 'p.pdf')!r}))\n"
        "print(b._proc.pid, flush=True)\n"
        + ("os.kill(os.getpid(), signal.SIGKILL)\n" if how == "killed" else "sys.exit(0)\n"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    pgid = int(res.stdout.split()[0])
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert group_gone(pgid, wait=20), f"chromium group {pgid} outlived its process"
    if how == "exit":
        assert list(scratch.iterdir()) == []
