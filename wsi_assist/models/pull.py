"""Fetch a registered model's files into the standard Hugging Face cache, checked.

Online, each file's expected checksum comes from the hub (the ETag of a file: the SHA-256
of an LFS file, the git blob SHA-1 of a small one) and the downloaded file must match it.
Offline (``HF_HUB_OFFLINE=1``), files already in the cache are checked against the blob
name the cache stores them under (that same ETag); a missing one is an error naming the
exact file and where it must go. Tokens (``HF_TOKEN``, ``huggingface-cli login`` or
``--token``) are passed to the hub for gated models.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wsi_assist.errors import ModelError
from wsi_assist.models.registry import ModelEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PulledFile:
    """One file in the cache and how it was checked."""

    name: str
    path: Path
    check: str  # "sha256", "git-sha1" or "unchecked"


def offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def pull(entry: ModelEntry, *, cache_dir: str | Path | None = None,
         token: str | None = None, revision: str | None = None) -> list[PulledFile]:
    """Every file of ``entry`` in the cache, checksums verified; errors are one line."""
    if offline():
        return [_check_cached(entry, name, path)
                for name, path in _cached_files(entry, cache_dir, revision)]
    return [_download(entry, name, cache_dir, token, revision)
            for name in _remote_files(entry, token, revision)]


def _matches(entry: ModelEntry, names: list[str]) -> list[str]:
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in entry.files))


def _remote_files(entry: ModelEntry, token: str | None, revision: str | None) -> list[str]:
    import huggingface_hub

    if entry.single_file:
        return list(entry.files)
    with _hub_errors(entry, entry.files[0]):
        listed = huggingface_hub.list_repo_files(entry.repo_id, revision=revision,
                                                 token=token)
    found = _matches(entry, listed)
    if not found:
        raise ModelError(f"{entry.repo_id}: no files match {', '.join(entry.files)}")
    return found


def _download(entry: ModelEntry, name: str, cache_dir: str | Path | None,
              token: str | None, revision: str | None) -> PulledFile:
    import huggingface_hub

    url = huggingface_hub.hf_hub_url(entry.repo_id, name, revision=revision)
    with _hub_errors(entry, name):
        meta = huggingface_hub.get_hf_file_metadata(url, token=token)
        path = Path(huggingface_hub.hf_hub_download(entry.repo_id, name, revision=revision,
                                                    cache_dir=cache_dir, token=token))
    return PulledFile(name, path, verify(path, meta.etag, f"{entry.repo_id}/{name}"))


@contextlib.contextmanager
def _hub_errors(entry: ModelEntry, name: str) -> Iterator[None]:
    """Hub exceptions -> one-line ModelErrors that say what to do."""
    from huggingface_hub import errors

    repo, where = entry.repo_id, f"{entry.repo_id}/{name}"
    try:
        yield
    except errors.GatedRepoError as e:
        raise ModelError(f"{repo} is gated: accept its licence at https://huggingface.co/"
                         f"{repo} and give a token (HF_TOKEN, hf auth login or --token)"
                         ) from e
    except errors.RepositoryNotFoundError as e:
        raise ModelError(f"{repo}: repository not found on the hub (or private: give a "
                         "token)") from e
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as e:
        raise ModelError(missing_message(entry, name, None)) from e
    except errors.EntryNotFoundError as e:
        raise ModelError(f"{where}: no such file in the repository") from e
    except (errors.HfHubHTTPError, OSError) as e:
        raise ModelError(f"{where}: cannot fetch from the hub "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def missing_message(entry: ModelEntry, name: str, cache_dir: str | Path | None) -> str:
    """Offline and not cached: the exact file and where to put it."""
    folder = cache_root(cache_dir) / f"models--{entry.repo_id.replace('/', '--')}"
    url = f"https://huggingface.co/{entry.repo_id}/resolve/main/{name}"
    return (f"offline (HF_HUB_OFFLINE=1) and {entry.repo_id}/{name} is not in the Hugging "
            f"Face cache: on a machine with network run `hf download {entry.repo_id} "
            f"{name}` and copy {folder} there, or download {url} to a folder of your "
            f"choice and set {entry.use('PATH')}")


def _cached_files(entry: ModelEntry, cache_dir: str | Path | None,
                  revision: str | None) -> list[tuple[str, Path]]:
    snapshot = _snapshot(entry, cache_dir, revision)
    if snapshot is None:
        raise ModelError(missing_message(entry, entry.files[0], cache_dir))
    names = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    wanted = list(entry.files) if entry.single_file else _matches(entry, names)
    missing = [n for n in wanted if n not in names]
    if missing or not wanted:
        raise ModelError(missing_message(entry, missing[0] if missing else entry.files[0],
                                         cache_dir))
    return [(n, snapshot / n) for n in wanted]


def _snapshot(entry: ModelEntry, cache_dir: str | Path | None,
              revision: str | None) -> Path | None:
    repo = cache_root(cache_dir) / f"models--{entry.repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if not commit or not (repo / "snapshots" / commit).is_dir():
        return None
    return repo / "snapshots" / commit


def _check_cached(entry: ModelEntry, name: str, path: Path) -> PulledFile:
    blob = Path(os.path.realpath(path))
    if blob.parent.name != "blobs":
        log.warning("%s: not a cache blob link; checksum not checked", path)
        return PulledFile(name, path, "unchecked")
    return PulledFile(name, path, verify(path, blob.name, f"{entry.repo_id}/{name}"))


def verify(path: Path, etag: str | None, what: str) -> str:
    """Check ``path`` against a hub ETag (SHA-256 or git blob SHA-1); returns which."""
    tag = (etag or "").removeprefix("W/").strip('"').lower()
    if len(tag) == 64:
        kind, digest = "sha256", _sha256(path)
    elif len(tag) == 40:
        kind, digest = "git-sha1", _git_blob_sha1(path)
    else:
        log.warning("%s: the hub gave no checksum (%r); not checked", what, etag)
        return "unchecked"
    if digest != tag:
        raise ModelError(f"{path}: checksum mismatch for {what}: {kind} {digest[:16]}... "
                         f"but the hub says {tag[:16]}...; delete it and pull again")
    return kind


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
