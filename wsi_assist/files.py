"""Small file helpers shared by every writer and reader: atomic writes, tolerant JSON and
YAML reading, where the shipped configs live, and one cache keyed by files' state."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import yaml

log = logging.getLogger(__name__)

V = TypeVar("V")


def host() -> str:
    """This machine's name, safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def owner_tag(pid: int | None = None) -> str:
    """``<host>.<pid>``: names what this process leaves behind, so that a later run
    can tell its own dead leftovers (:func:`dead_owner`) from another live run's."""
    return f"{host()}.{os.getpid() if pid is None else pid}"


#: OUT's folder of per-process scratch folders.
WORK_DIR = ".work"


def work_dir(out: Path) -> Path:
    """This process's scratch folder in OUT, ``OUT/.work/<host>.<pid>``: slides are
    built there and swapped into place, Chromium keeps its temporary profile there;
    what a killed process leaves is removed by the next run (:func:`remove_leftovers`)."""
    return out / WORK_DIR / owner_tag()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_owner(name: str, temp_file: bool = False) -> bool:
    """Whether ``name`` ends in this host's :func:`owner_tag` with a dead pid: a leftover
    of a process killed here (names from other hosts are never dead here). With
    ``temp_file``, only hidden :func:`temp_name` names count."""
    me = re.escape(host())
    pattern = (rf"^\..*\.{me}\.(\d+)\.tmp(?:\.[^.]*)?$" if temp_file
               else rf"(?:^|\.){me}\.(\d+)(?:\.tmp(?:\.[^.]*)?)?$")
    m = re.search(pattern, name)
    return m is not None and not pid_alive(int(m.group(1)))


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique per process, keeping the suffix
    (``report.pdf`` -> ``.report.<host>.<pid>.tmp.pdf``)."""
    return path.with_name(f".{path.stem}.{owner_tag()}.tmp{path.suffix}")


def remove_leftovers(folder: Path, temp_files_only: bool = False) -> list[Path]:
    """Remove what dead processes of this host left in ``folder`` (see
    :func:`dead_owner`): work folders and temporary files, or with ``temp_files_only``
    just hidden temporary files. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not dead_owner(e.name, temp_file=temp_files_only):
            continue
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as err:
            log.warning("%s: cannot remove leftover of a dead process (%s)", p,
                        err.strerror or err)
            continue
        removed.append(p)
    return removed


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a slide file, in words, or None when it is a
    readable regular file. Never opens it: opening a FIFO blocks until a writer comes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
        return f"cannot be read ({e.strerror or 'unknown error'})"
    mode = st.st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(mode):
            return f"is {kind}, not a slide file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or exhausted quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def disk_of(path: Path) -> str:
    """The mount point of the file system holding ``path`` (or its nearest existing
    parent), e.g. ``/data``."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        dev = p.stat().st_dev
        while p != p.parent and p.parent.stat().st_dev == dev:
            p = p.parent
    except OSError:
        pass
    return str(p)


class QuietFileHandler(logging.FileHandler):
    """A log file that never prints "--- Logging error ---" when it cannot be written
    (a full disk): failed records are counted in ``failures`` and dropped."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=False)
        self.failures = 0
        self.last_error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        self.failures += 1
        self.last_error = sys.exc_info()[1]

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self.failures += 1
            self.last_error = e

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the last flush
            self.failures += 1
            self.last_error = e


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds,
    so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, newline: str | None = None, fsync: bool = False
                ) -> Iterator[IO[str]]:
    """A text file opened for writing that replaces ``path`` when closed without error."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline=newline) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (non-JSON values as ``str``)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def read_json(path: Path, left_out_of: str | None = None) -> Any:
    """A JSON file's content, or None when it is absent or unreadable; an unreadable
    file is logged as left out of ``left_out_of`` (when given)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if left_out_of:
            log.warning("%s: cannot read (%s); left out of %s", path, e, left_out_of)
        return None


def read_yaml(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The raw data of a YAML file; ``error`` naming the file and ``what`` it should be
    when it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e


def configs_dir() -> Path:
    """``configs/`` of a source checkout, or the copy packaged in the wheel."""
    here = Path(__file__).resolve().parent
    for p in (here / "configs", here.parent / "configs"):
        if (p / "default.yaml").is_file():
            return p
    raise FileNotFoundError(f"configs/default.yaml not found next to {here}")


def file_fingerprint(path: Path) -> str:
    """Size, mtime and a hash of the first MB: cheap, and changes when the file does.
    Refuses anything but a regular file before opening it (a FIFO would block)."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{path}: {file_problem(path) or 'not a regular file'}")
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def file_state(path: Path) -> tuple[str, int, int, int] | None:
    """(resolved path, inode, size, mtime) of a file, or None when it cannot be stat'ed:
    changes whenever the file is replaced or rewritten."""
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


class FileCache(Generic[V]):
    """Values built once per process from files (hashes, models, sessions), rebuilt
    when any of those files changes. Thread-safe; a value is built under the lock."""

    def __init__(self) -> None:
        self._items: dict[Hashable, V] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, files: tuple[Path, ...], make: Callable[[], V]) -> V:
        """The value for ``key`` and the current state of ``files``; ``make()`` on a miss."""
        full = (key, tuple(file_state(f) for f in files))
        with self._lock:
            if full not in self._items:
                self._items[full] = make()
            return self._items[full]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
