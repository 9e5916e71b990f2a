"""``report.pdf`` and screenshots from the HTML with headless Chromium, when installed."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from wsi_assist.files import atomic_path
from wsi_assist.report.browser import Browser, BrowserError, current

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", "--no-pdf-header-footer")


#: Environment variables pointed into Chromium's scratch folder, and their sub-folders.
CHROMIUM_DIRS = {"HOME": "home", "XDG_CONFIG_HOME": "config", "XDG_CACHE_HOME": "cache",
                 "XDG_DATA_HOME": "data", "XDG_STATE_HOME": "state",
                 "XDG_RUNTIME_DIR": "runtime", "TMPDIR": "tmp"}


def find_browser() -> str | None:
    """Path of a Chromium executable, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(args: list[str], html: Path, timeout: float = 120.0,
             scratch: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``html`` with ``args`` (absolute paths). Its profile,
    HOME, XDG folders and TMPDIR are a fresh folder inside ``scratch`` (default: beside
    ``html``), removed afterwards: it writes nothing elsewhere (~/.config, ~/.cache/dconf,
    /tmp)."""
    exe = find_browser()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    base = scratch if scratch is not None else html.parent
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".chromium-", dir=base) as tmp:
        root = Path(tmp).resolve()
        env = {**os.environ, **{var: str(root / sub) for var, sub in CHROMIUM_DIRS.items()}}
        # relative, from cwd=root: Chromium binds a Unix socket (a 108-byte path at most)
        # in $TMPDIR, which a deep OUT would make too long
        env["TMPDIR"] = CHROMIUM_DIRS["TMPDIR"]
        for sub in CHROMIUM_DIRS.values():
            (root / sub).mkdir(mode=0o700)
        cmd = [exe, *FLAGS, f"--user-data-dir={root / 'profile'}",
               f"--crash-dumps-dir={root / 'crash'}", *args, html.resolve().as_uri()]
        return run_own_session(cmd, timeout, env, root)


def run_own_session(cmd: list[str], timeout: float, env: dict[str, str],
                    cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a session (process group) of its own, so that the SIGINT of a
    Ctrl-C in the terminal, which reaches the whole foreground group, does not stop it
    halfway through a PDF; the run decides when to stop. The group (Chromium and its
    renderers) is killed on a timeout, an interrupt or any error, and when it is done."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout, KeyboardInterrupt: never leave Chromium behind
        _kill_group(proc)
        raise
    _kill_group(proc)  # renderers that outlive their browser
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class _NoPdf(Exception):
    """Chromium ran but wrote no PDF; the message is the note to return."""


def batch_browser(scratch: Path) -> Browser | None:
    """One Chromium for a batch's PDFs (see :mod:`browser`), its temporary folder in
    ``scratch``; None when Chromium is not installed. Started on its first page."""
    exe = find_browser()
    # --no-pdf-header-footer puts headless Chromium in its print-one-page command mode,
    # in which it opens no page to drive; printToPDF's own options say the same
    flags = tuple(f for f in FLAGS if f != "--no-pdf-header-footer")
    return None if exe is None else Browser(exe, flags, scratch, CHROMIUM_DIRS)


def write_pdf(html: Path, pdf: Path, scratch: Path | None = None) -> str:
    """Print ``html`` to ``pdf``; returns a note ("written", or why it was skipped):
    with the batch's browser when one is open (:func:`browser.shared`), else by running
    Chromium once. ``scratch``: where that Chromium's temporary folder goes (see
    :func:`chromium`)."""
    if find_browser() is None:
        log.info("report.pdf skipped: chromium is not installed")
        return "skipped: chromium not installed"
    shared = current()
    if shared is not None:
        try:
            with atomic_path(pdf) as tmp:
                shared.print_pdf(html, tmp)
                if tmp.stat().st_size == 0:
                    raise BrowserError("empty PDF")
            return "written"
        except BrowserError as e:  # this slide alone: Chromium once, as without a batch
            log.warning("report.pdf: the batch's chromium failed on %s (%s); running "
                        "chromium for it alone", html, e)
    try:
        with atomic_path(pdf) as tmp:
            res = chromium([f"--print-to-pdf={tmp.resolve()}"], html, scratch=scratch)
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
