"""``report.pdf`` and screenshots from the HTML with headless Chromium, when installed."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", "--no-pdf-header-footer")


def find_browser() -> str | None:
    """Path of a Chromium executable, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(args: list[str], html: Path, timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``html`` with ``args`` and a fresh profile folder."""
    exe = find_browser()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="wsi-assist-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args, html.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)


def write_pdf(html: Path, pdf: Path) -> str:
    """Print ``html`` to ``pdf``; returns a note ("written", or why it was skipped)."""
    if find_browser() is None:
        log.info("report.pdf skipped: chromium is not installed")
        return "skipped: chromium not installed"
    tmp = pdf.with_name(pdf.name + ".part.pdf")
    try:
        res = chromium([f"--print-to-pdf={tmp.resolve()}"], html)
    except subprocess.TimeoutExpired:
        log.warning("report.pdf skipped: chromium timed out")
        return "skipped: chromium timed out"
    if res.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("report.pdf not written: chromium exit %s: %s", res.returncode, tail)
        tmp.unlink(missing_ok=True)
        return f"failed: chromium exit {res.returncode}"
    tmp.replace(pdf)
    return "written"
