"""One headless Chromium kept for a batch, printing each slide's report to PDF.

Starting Chromium costs 1.3-1.6 s; a batch of small slides spent most of its report
stage on it. :class:`Browser` starts one, talks to it over its DevTools protocol on a
pair of pipes (``--remote-debugging-pipe``: fd 3 in, fd 4 out, JSON messages ended by a
NUL byte; no port, no websocket library), and prints each report in the page it opened
at start: ``Page.navigate`` → ``Page.loadEventFired`` (images loaded) →
``Page.printToPDF``. The options are those of Chromium's own
``--print-to-pdf`` with ``--no-pdf-header-footer`` (backgrounds printed, the page's
CSS page size, no header or footer).

A page that fails (an error, a timeout, the browser gone) raises :class:`BrowserError`
and the browser is stopped; the next page starts a fresh one, so one slide never fails
another. :func:`shared` opens the batch's browser (``batch.run_batch`` does, around its
local loop); :func:`current` is what ``pdf.write_pdf`` uses, else it runs Chromium once.
A slide that will write a PDF starts it ahead (:func:`warm_current`: Chromium starts in
the background while the slide's first stages run).
On a Dask worker (``--workers``, ``--scheduler``) each worker process keeps one browser
for all the slides it reports (:func:`for_process`, made current by :func:`using`),
closed at the end of the batch (:func:`close_process_browsers`) or when the process ends.
Chromium's profile, HOME, XDG folders and TMPDIR are a folder inside the batch's scratch
folder, removed when the batch ends.

Chromium runs in a session of its own (``start_new_session``): a Ctrl-C in the terminal
sends SIGINT to the whole foreground process group, and the run, not Chromium, decides
what stops. It still ends with the run: it exits when its pipe closes (the process that
started it has ended, however), and :meth:`Browser.close` kills its group.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
#: Where Chromium's log goes (a file while debugging).
_STDERR: Any = subprocess.DEVNULL

#: Seconds to wait for one page to load and print.
PAGE_TIMEOUT = 120.0
#: printToPDF options matching ``chromium --headless --print-to-pdf --no-pdf-header-footer``.
PRINT = {"printBackground": True, "preferCSSPageSize": True, "displayHeaderFooter": False,
         "transferMode": "ReturnAsBase64"}
#: The shell moves the pipes to the fds Chromium reads (3) and writes (4): no preexec_fn,
#: which is unsafe in a process with threads.
LAUNCH = 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null'


class BrowserError(Exception):
    """One page could not be printed (the message says why, in words)."""


class Browser:
    """A headless Chromium driven over ``--remote-debugging-pipe``; one page at a time."""

    def __init__(self, exe: str, flags: tuple[str, ...], scratch: Path,
                 env_dirs: dict[str, str]) -> None:
        self._exe, self._flags, self._scratch, self._dirs = exe, flags, scratch, env_dirs
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._buf = b""
        self._session: str | None = None
        self._next_id = 0
        self._lock = threading.Lock()
        self._warming = self._retired = False
        self.starts = 0  # how many Chromium processes were started (the bench and tests)

    def print_pdf(self, html: Path, out: Path, timeout: float = PAGE_TIMEOUT) -> None:
        """Print ``html`` to ``out``; BrowserError when it cannot (the browser is then
        stopped, and the next call starts a new one)."""
        with self._lock:
            try:
                self._start()
                out.write_bytes(self._print(html, time.monotonic() + timeout))
            except (OSError, ValueError, KeyError, BrowserError) as e:
                self.close()
                raise BrowserError(str(e) or type(e).__name__) from e

    def warm(self) -> threading.Thread | None:
        """Start Chromium and attach to its page in a background thread (returned; None
        when it runs or is starting already, or after :meth:`shutdown`: the batch has
        ended, and a slide still finishing on a worker must not start one), so that the
        first PDF does not wait 1.3-1.6 s for it while the slide's other stages could
        run. A failure here is left to :meth:`print_pdf`, which starts a fresh one."""
        if self._retired or self._warming or (self._proc is not None
                                               and self._proc.poll() is None):
            return None
        self._warming = True
        thread = threading.Thread(target=self._warm, name="chromium-warm", daemon=True)
        thread.start()
        return thread

    def _warm(self) -> None:
        with self._lock:
            try:
                if self._retired:  # shut down before this thread got the lock
                    return
                self._start()
                if self._session is None:
                    self._session = self._attach(time.monotonic() + PAGE_TIMEOUT)
            except (OSError, ValueError, KeyError, BrowserError) as e:
                log.debug("chromium did not start ahead of the first PDF (%s)", e)
                self.close()
            finally:
                self._warming = False

    def shutdown(self, wait: float = 10.0) -> None:
        """:meth:`close`, after the page being printed (up to ``wait`` seconds)."""
        self._retired = True  # a slide still running on a worker starts no warm-up
        got = self._lock.acquire(timeout=wait)
        try:
            self.close()
        finally:
            if got:
                self._lock.release()

    def close(self) -> None:
        """Stop Chromium (if running) and remove its scratch folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
            try:
                proc.wait(timeout=5)  # it exits when its pipe closes
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its renderers, still writing the profile
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._buf, self._session = b"", None

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        self._scratch.mkdir(parents=True, exist_ok=True)
        root = self._tmp = Path(tempfile.mkdtemp(prefix=".chromium-", dir=self._scratch))
        root = root.resolve()
        env = {**os.environ, **{var: str(root / sub) for var, sub in self._dirs.items()}}
        env["TMPDIR"] = self._dirs["TMPDIR"]  # relative: a short socket path (see pdf.py)
        for sub in self._dirs.values():
            (root / sub).mkdir(mode=0o700)
        cmd = ["sh", "-c", LAUNCH, self._exe, *self._flags, "--remote-debugging-pipe",
               f"--user-data-dir={root / 'profile'}", f"--crash-dumps-dir={root / 'crash'}",
               "about:blank"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=_STDERR, env=env, cwd=root,
                                      start_new_session=True)  # its own process group
        self.starts += 1
        _LIVE.add(self)
        log.debug("chromium started for the batch's PDFs (pid %d)", self._proc.pid)

    def _attach(self, deadline: float) -> str:
        """The session of the page Chromium opened at start (tabs created later over the
        protocol lose their renderer in headless Chromium 150: the one page is reused)."""
        while True:  # the page appears a moment after Chromium starts
            pages = [t for t in self._call("Target.getTargets", {}, deadline)["targetInfos"]
                     if t.get("type") == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise BrowserError("chromium opened no page")
            time.sleep(0.05)
        session = self._call("Target.attachToTarget", {"targetId": pages[0]["targetId"],
                                                       "flatten": True}, deadline)
        self._call("Page.enable", {}, deadline, session["sessionId"])
        return str(session["sessionId"])

    def _print(self, html: Path, deadline: float) -> bytes:
        if self._session is None:
            self._session = self._attach(deadline)
        session = self._session
        self._loaded = None
        nav = self._call("Page.navigate", {"url": html.resolve().as_uri()}, deadline, session)
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {html}: {nav['errorText']}")
        self._wait_event("Page.loadEventFired", session, deadline)
        return base64.b64decode(self._call("Page.printToPDF", PRINT, deadline,
                                           session)["data"])

    def _call(self, method: str, params: dict[str, Any], deadline: float,
              session: str | None = None) -> dict[str, Any]:
        """Send one command; its result (events read meanwhile are dropped, except the
        load event, which is kept for :meth:`_wait_event`)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        stdin = self._proc.stdin if self._proc is not None else None
        if stdin is None:
            raise BrowserError("chromium is not running")
        stdin.write(json.dumps(msg).encode() + b"\0")
        stdin.flush()
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply)}")
                return dict(reply.get("result", {}))
            if reply.get("method") == "Page.loadEventFired":
                self._loaded = reply.get("sessionId")

    _loaded: str | None = None

    def _wait_event(self, method: str, session: str, deadline: float) -> None:
        if self._loaded == session:
            self._loaded = None
            return
        while True:
            ev = self._read(deadline)
            if ev.get("method") == method and ev.get("sessionId") == session:
                return

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next NUL-ended message from Chromium, or BrowserError at the deadline or
        when it has exited."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise BrowserError("chromium is not running")
        fd = proc.stdout.fileno()
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium timed out")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium exited (status {proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return dict(json.loads(raw))


_CURRENT: Browser | None = None
#: a browser made current in one thread (a Dask worker's task) by :func:`using`
_THREAD = threading.local()
#: this process's browser for Dask tasks, by scratch folder (at most one)
_PROCESS: dict[Path, Browser] = {}
_PROCESS_LOCK = threading.Lock()
#: every browser started in this process: closed at exit (Chromium and its folder)
_LIVE: weakref.WeakSet[Browser] = weakref.WeakSet()


def current() -> Browser | None:
    """The browser :func:`using` gave this thread, else the batch's browser while
    :func:`shared` is open in this process, else None."""
    return getattr(_THREAD, "browser", None) or _CURRENT


def warm_current() -> None:
    """Start the :func:`current` browser ahead of its first page (:meth:`Browser.warm`),
    if there is one: a slide whose stages end with a PDF is starting."""
    b = current()
    if b is not None:
        b.warm()


@contextlib.contextmanager
def using(browser: Browser | None) -> Iterator[Browser | None]:
    """Make ``browser`` :func:`current` in this thread while the block runs; it stays
    open afterwards (a worker's browser, reused by its next slide)."""
    previous = getattr(_THREAD, "browser", None)
    _THREAD.browser = browser
    try:
        yield browser
    finally:
        _THREAD.browser = previous


def for_process(scratch: Path, make: Callable[[Path], Browser | None]) -> Browser | None:
    """This process's browser with its temporary folder in ``scratch``, made by ``make``
    on first use (None: no Chromium). One made for another scratch folder (an earlier
    batch, another OUT) is closed first: a worker serving several batches keeps at most
    one Chromium and writes nothing into an OUT it no longer works for."""
    with _PROCESS_LOCK:
        b = _PROCESS.get(scratch)
        if b is not None:
            return b
        for old in _PROCESS.values():
            old.shutdown()
        _PROCESS.clear()
        b = make(scratch)
        if b is not None:
            _PROCESS[scratch] = b
        return b


def close_process_browsers() -> int:
    """Close this process's browsers made by :func:`for_process` (the end of a batch on
    a Dask worker); how many Chromium processes they started in all."""
    with _PROCESS_LOCK:
        made = list(_PROCESS.values())
        _PROCESS.clear()
    for b in made:
        b.shutdown()
    return sum(b.starts for b in made)


@atexit.register
def _close_live() -> None:
    for b in list(_LIVE):
        b.close()


@contextlib.contextmanager
def shared(browser: Browser | None) -> Iterator[Browser | None]:
    """Make ``browser`` the one :func:`current` gives while the block runs (None: no
    Chromium installed, nothing to share), and close it at the end."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, browser
    try:
        yield browser
    finally:
        _CURRENT = previous
        if browser is not None:
            browser.shutdown()  # after a warm-up or page in progress
