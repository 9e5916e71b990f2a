"""``report.pdf`` and screenshots from the HTML with headless Chromium, when installed."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from wsi_assist.files import atomic_path

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


class _NoPdf(Exception):
    """Chromium ran but wrote no PDF; the message is the note to return."""


def write_pdf(html: Path, pdf: Path) -> str:
    """Print ``html`` to ``pdf``; returns a note ("written", or why it was skipped)."""
    if find_browser() is None:
        log.info("report.pdf skipped: chromium is not installed")
        return "skipped: chromium not installed"
    try:
        with atomic_path(pdf) as tmp:
            res = chromium([f"--print-to-pdf={tmp.resolve()}"], html)
            if res.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
                tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
                log.warning("report.pdf not written: chromium exit %s: %s", res.returncode,
                            tail)
                raise _NoPdf(f"failed: chromium exit {res.returncode}")
    except subprocess.TimeoutExpired:
        log.warning("report.pdf skipped: chromium timed out")
        return "skipped: chromium timed out"
    except _NoPdf as e:
        return str(e)
    return "written"
