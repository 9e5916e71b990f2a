"""models pull: huggingface_hub mocked (no network), checked against hub ETags, offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from wsi_assist.errors import ConfigError, ModelError
from wsi_assist.models import pull as pull_mod
from wsi_assist.models import registry

PATHCLIP_BYTES = b"pretend state_dict " * 1000
CONFIG_BYTES = b'{"model_cfg": {"embed_dim": 512}}'


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _git_sha1(b: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


class FakeHub:
    """Serves files like the hub: ETag = sha256 for LFS (> 1 kB here), git sha1 else; the
    download writes the cache layout (blobs named by ETag, snapshot links, refs/main)."""

    commit = "c0ffee" * 6 + "abcd"

    def __init__(self, files: dict[str, bytes], served: dict[str, bytes] | None = None):
        self.files, self.served = files, served or files
        self.tokens: list[object] = []

    def etag(self, name: str) -> str:
        b = self.files[name]
        return _sha256(b) if len(b) > 1000 else _git_sha1(b)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        mp.setattr(huggingface_hub, "list_repo_files",
                   lambda repo, revision=None, token=None: sorted(self.files) + ["README.md"])
        mp.setattr(huggingface_hub, "get_hf_file_metadata", self.metadata)
        mp.setattr(huggingface_hub, "hf_hub_download", self.download)

    def metadata(self, url: str, token: object = None) -> SimpleNamespace:
        self.tokens.append(token)
        return SimpleNamespace(etag=f'"{self.etag(url.rsplit("/", 1)[1])}"')

    def download(self, repo: str, name: str, revision: object = None, cache_dir: object = None,
                 token: object = None) -> str:
        self.tokens.append(token)
        root = Path(str(cache_dir)) / f"models--{repo.replace('/', '--')}"
        blob = root / "blobs" / self.etag(name)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(self.served[name])
        link = root / "snapshots" / self.commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(self.commit)
        return str(link)


@pytest.fixture()
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def test_registry_names_and_unknown() -> None:
    assert {"pathclip", "quiltnet-b-32", "pathgen-clip", "plip", "uni", "virchow2",
            "h-optimus-0", "prov-gigapath", "phikon-v2", "llava-med", "quilt-llava",
            "pathgen-llava", "qwen2.5-vl-7b", "medgemma-4b"} <= set(registry.names())
    assert registry.get("PathCLIP").files == ("pathclip-base.pt",)
    with pytest.raises(ConfigError, match="no model 'nope'; known: pathclip"):
        registry.get("nope")


def test_pull_single_file_checks_sha256_and_passes_the_token(
        tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({"pathclip-base.pt": PATHCLIP_BYTES})
    hub.install(monkeypatch)
    files = pull_mod.pull(registry.get("pathclip"), cache_dir=tmp_path, token="hf_x")
    assert [(f.name, f.check) for f in files] == [("pathclip-base.pt", "sha256")]
    assert files[0].path.read_bytes() == PATHCLIP_BYTES and set(hub.tokens) == {"hf_x"}


def test_pull_patterns_fetch_only_matching_files(tmp_path: Path, online: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({"open_clip_config.json": CONFIG_BYTES,
                   "open_clip_pytorch_model.bin": PATHCLIP_BYTES})
    hub.install(monkeypatch)
    files = pull_mod.pull(registry.get("quiltnet-b-32"), cache_dir=tmp_path)
    assert {f.name: f.check for f in files} == {"open_clip_config.json": "git-sha1",
                                                "open_clip_pytorch_model.bin": "sha256"}


def test_checksum_mismatch_is_an_error(tmp_path: Path, online: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({"pathclip-base.pt": PATHCLIP_BYTES},
                  served={"pathclip-base.pt": PATHCLIP_BYTES[:-1] + b"!"})
    hub.install(monkeypatch)
    from wsi_assist.cli import app

    res = CliRunner().invoke(app, ["models", "pull", "pathclip", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "checksum mismatch for jamessyx/pathclip/pathclip-base.pt: sha256" in res.output


def test_offline_uses_and_checks_the_cache(tmp_path: Path, online: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    FakeHub({"pathclip-base.pt": PATHCLIP_BYTES}).install(monkeypatch)
    pull_mod.pull(registry.get("pathclip"), cache_dir=tmp_path)
    import huggingface_hub

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("offline pull touched the hub")

    for fn in ("list_repo_files", "get_hf_file_metadata", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, fn, no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from wsi_assist.cli import app

    res = CliRunner().invoke(app, ["models", "pull", "pathclip", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "sha256" in res.output and "embed.pathclip:" in res.output
    blob = next((tmp_path / "models--jamessyx--pathclip" / "blobs").iterdir())
    blob.write_bytes(b"truncated")
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull_mod.pull(registry.get("pathclip"), cache_dir=tmp_path)


def test_offline_and_missing_names_the_file_and_where(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        pull_mod.pull(registry.get("pathclip"), cache_dir=tmp_path)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "jamessyx/pathclip/pathclip-base.pt" in msg
    assert str(tmp_path / "models--jamessyx--pathclip") in msg
    assert "https://huggingface.co/jamessyx/pathclip/resolve/main/pathclip-base.pt" in msg


def test_gated_repo_says_how_to_get_access(tmp_path: Path, online: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    def gated(*a: object, **k: object) -> None:
        raise errors.GatedRepoError("restricted", response=SimpleNamespace(
            headers={}, status_code=401, request=None))

    for fn in ("list_repo_files", "get_hf_file_metadata", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, fn, gated)
    with pytest.raises(ModelError, match="MahmoodLab/UNI is gated: accept its licence at "
                                         "https://huggingface.co/MahmoodLab/UNI"):
        pull_mod.pull(registry.get("uni"), cache_dir=tmp_path)
