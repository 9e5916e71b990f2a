"""Small file helpers shared by every writer and reader: atomic writes, tolerant JSON and
YAML reading, where the shipped configs live, and one cache keyed by files' state."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import yaml

log = logging.getLogger(__name__)

V = TypeVar("V")


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique per process, keeping the suffix
    (``report.pdf`` -> ``.report.<pid>.tmp.pdf``)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


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
    """Size, mtime and a hash of the first MB: cheap, and changes when the file does."""
    st = path.stat()
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
