"""Faults a batch meets overnight: special files, clashing names, a full disk, concurrent
runs, bad explicit inputs, cut files, leftovers of killed runs, writes outside OUT and
failure reasons. Each test builds its own inputs."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from wsi_assist import batch, config, files, locks
from wsi_assist.chunks import ZERO_RUN
from wsi_assist.cli import app
from wsi_assist.settings import TilingParams
from wsi_assist.slide import describe
from wsi_assist.synthetic import default_slide, write_slide
from wsi_assist.tiling import TileGrid

runner = CliRunner()
TILE = ["--stages", "tissue,tiles"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic slides with different content."""
    d = tmp_path_factory.mktemp("faults")
    return [write_slide(d / f"s{i}.svs", default_slide(1024, 768, seed=i), kind="svs")
            for i in range(3)]


def manifest(out: Path) -> dict[str, dict[str, str]]:
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_assist", *args]


def _env(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **extra}


def _special_files(d: Path) -> dict[str, str]:
    """A FIFO, a socket, a folder, a link loop and a broken link, all named like slides;
    name -> the reason expected in the manifest."""
    os.mkfifo(d / "fifo.svs")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.svs"))
    sock.close()
    (d / "folder.svs").mkdir()
    (d / "loop.svs").symlink_to("loop.svs")
    (d / "broken.tif").symlink_to("nowhere.tif")
    return {"fifo.svs": "named pipe", "sock.svs": "socket", "folder.svs": "is a folder",
            "loop.svs": "link loop", "broken.tif": "broken symbolic link"}


def test_special_files_are_refused_before_opening_and_listed(slides: list[Path],
                                                             tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(slides[0], src / "good.svs")
    expected = _special_files(src)
    out = tmp_path / "out"
    # a subprocess with a timeout: before the fix, opening the FIFO blocked forever
    r = subprocess.run(_cli("tile", str(src), "-o", str(out)), capture_output=True, check=False,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 1, r.stderr
    rows = manifest(out)
    assert rows["good.svs"]["status"] == "done"
    for name, reason in expected.items():
        row = rows[name]
        assert row["status"] == "failed" and row["stage"] == "open", row
        assert name in row["error"] and reason in row["error"], row
    r = subprocess.run(_cli("info", str(src / "fifo.svs")), capture_output=True, text=True,
                       timeout=60, env=_env(), check=False)
    assert r.returncode == 2 and "named pipe" in r.stderr and "empty file" not in r.stderr


def test_bad_explicit_inputs_fail_alone(slides: list[Path], tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "loop.svs").symlink_to("loop.svs")
    (d / "broken.svs").symlink_to("gone.svs")
    locked = d / "locked.svs"
    shutil.copy(slides[1], locked)
    locked.chmod(0)
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(slides[0]), str(d / "loop.svs"), str(d / "broken.svs"),
                            str(locked), "-o", str(out)])
    rows = manifest(out)
    assert rows["s0.svs"]["status"] == "done", r.output
    assert "link loop" in rows["loop.svs"]["error"]
    assert "broken symbolic link" in rows["broken.svs"]["error"]
    if os.geteuid() != 0:  # root reads any file
        assert "permission denied" in rows["locked.svs"]["error"]
        assert r.exit_code == 1
    assert r.exit_code == 1 and "Traceback" not in r.output
    # a path that does not exist at all is still a usage error
    r = runner.invoke(app, ["tile", str(slides[0]), str(d / "typo.svs"), "-o", str(out)])
    assert r.exit_code == 2 and "no such file or folder" in r.stderr


def test_same_file_name_in_two_inputs_gets_two_stable_ids(slides: list[Path],
                                                          tmp_path: Path) -> None:
    a, b = tmp_path / "dirA", tmp_path / "dirB"
    a.mkdir()
    b.mkdir()
    shutil.copy(slides[0], a / "same.svs")
    shutil.copy(slides[1], b / "same.svs")
    ids = batch.slide_ids([a / "same.svs", b / "same.svs"], [a, b])
    assert len(set(ids.values())) == 2
    assert batch.slide_ids([a / "same.svs", b / "same.svs"], [a, b]) == ids
    out = tmp_path / "out"
    assert runner.invoke(app, ["tile", str(a), str(b), "-o", str(out)]).exit_code == 0
    rows = list(manifest_rows(out))
    assert len({r["slide_id"] for r in rows}) == 2
    for r in rows:
        done = json.loads((out / r["slide_id"] / "done.json").read_text())
        assert done["path"] == r["path"]
    assert runner.invoke(app, ["tile", str(a), str(b), "-o", str(out)]).exit_code == 0
    assert [r["status"] for r in manifest_rows(out)] == ["skipped", "skipped"]


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mount_small_tmpfs(where: Path, size_kb: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                        str(where)], capture_output=True, check=False)
    return r.returncode == 0


def _fill(disk: Path, leave_kb: int) -> None:
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("ab") as f:
        f.write(b"\0" * max(0, free - leave_kb * 1024))


def test_full_disk_one_line_per_slide_and_the_manifest_kept(slides: list[Path],
                                                            tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk, 4096):
        pytest.skip("needs root and tmpfs to make a small real file system")
    try:
        out = disk / "out"
        assert runner.invoke(app, ["tile", str(slides[0]), "-o", str(out)]).exit_code == 0
        before = (out / "manifest.csv").read_text()
        _fill(disk, 12)
        r = runner.invoke(app, ["run", str(slides[0]), str(slides[1]), "-o", str(out),
                                *TILE, "--force"])
        assert r.exit_code == 1, r.output
        assert "Logging error" not in r.output and "Traceback" not in r.output, r.output
        failed = [line for line in r.stderr.splitlines() if line.startswith("failed [")]
        assert failed, r.output
        for line in failed:
            assert "no space left on the disk" in line and str(disk) in line
            assert any(str(s) in line for s in slides[:2])
            assert not line.startswith("failed [open]")
        assert not [p for p in out.iterdir() if ".tmp" in p.name]
        text = (out / "manifest.csv").read_text()  # the new one, or the previous kept
        assert text == before or all(str(s) in text for s in slides[:2])
        assert json.loads((out / "s0" / "done.json").read_text())["n_tiles"] > 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_done_json_failing_on_a_full_disk_is_a_write_failure(
        slides: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = files.write_json

    def full(path: Path, data: object) -> None:
        if path.name == batch.DONE_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(files, "write_json", full)
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(slides[0]), "-o", str(out)])
    assert r.exit_code == 1
    row = manifest(out)["s0.svs"]
    assert row["stage"] == "write" and row["status"] == "failed"
    assert str(slides[0]) in row["error"] and "no space left on the disk" in row["error"]
    assert not (out / "s0").exists() and not list((out / ".work").rglob("*"))


def test_unwritable_run_log_is_counted_not_printed(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.log").symlink_to("/dev/full")  # every write: ENOSPC
    r = runner.invoke(app, ["tile", str(slides[0]), "-o", str(out)])
    assert "Logging error" not in r.output and "Traceback" not in r.output, r.output
    assert r.exit_code == 1 and "log messages not written" in r.stderr
    assert manifest(out)["s0.svs"]["status"] == "done"


def test_manifest_describes_out_after_another_run_finished_the_slide(
        slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = config.from_dict({**config.load().to_dict(), "stages": ["tissue", "tiles"]})
    locks_dir = out / ".locks"
    locks_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": 0})
    try:  # another live run holds s0 ...
        (locks_dir / "s0.lock").write_text(held)
        busy = batch.process_slide(slides[0], "s0", out, cfg)
        assert busy.status == "skipped" and busy.error.startswith("being processed by")
        (locks_dir / "s0.lock").unlink()  # ... and finishes it
        other = batch.process_slide(slides[0], "s0", out, cfg)
        assert other.status == "done" and other.n_tiles
        [now] = batch.as_out_is([busy], out, cfg)
        assert now.status == "skipped" and now.error == "" and now.n_tiles == other.n_tiles
        assert now.seconds == pytest.approx(other.seconds, abs=1e-3)
        # another run holds s1, then dies without finishing it
        (locks_dir / "s1.lock").write_text(held)
        busy = batch.process_slide(slides[1], "s1", out, cfg)
        assert busy.status == "skipped"
        [still] = batch.as_out_is([busy], out, cfg)
        assert still.status == "skipped" and "being processed" in still.error
    finally:
        sleeper.kill()
        sleeper.wait()
    assert locks.live_holder(locks_dir / "s1.lock") is None
    [now] = batch.as_out_is([busy], out, cfg)
    assert now.status == "failed" and "did not finish it" in now.error


def test_cut_ome_tiff_is_an_error_naming_the_file(shared_slides: Path, tmp_path: Path) -> None:
    data = (shared_slides / "HE_example.ome.tif").read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[:256])  # tile offsets and counts lie past the end: tags dropped
    short = tmp_path / "short.ome.tif"
    short.write_bytes(data[:-4000])  # the last tiles point past the end
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(cut), str(short), "-o", str(out), "--mpp", "0.5"])
    assert r.exit_code == 1
    rows = manifest(out)
    for name in ("cut.ome.tif", "short.ome.tif"):
        assert rows[name]["status"] == "failed" and rows[name]["stage"] == "open"
        assert name in rows[name]["error"] and "truncated" in rows[name]["error"]
    r = runner.invoke(app, ["info", str(cut)])
    assert r.exit_code == 2 and "truncated" in r.stderr


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_processes_are_removed_never_a_live_runs(
        slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = out / ".work"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, live = files.owner_tag(_dead_pid()), files.owner_tag(sleeper.pid)
    for d in (work / dead / "s1" / "slide.zarr", work / dead / ".chromium-x" / "home",
              work / live / "other" / "slide.zarr",
              work / f"elsewhere.{_dead_pid()}" / "s2" / "slide.zarr",
              work / f"s2.{_dead_pid()}" / "slide.zarr"):  # an older version's name
        d.mkdir(parents=True)
        (d / "blob").write_bytes(b"x" * 1000)
    tmp = out / f".manifest.{dead}.tmp.csv"
    tmp.write_text("partial")
    mine = out / f".manifest.{live}.tmp.csv"
    mine.write_text("being written")
    try:
        assert runner.invoke(app, ["tile", str(slides[0]), "-o", str(out)]).exit_code == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    left = sorted(p.name for p in work.iterdir())
    assert live in left and (work / live / "other" / "slide.zarr" / "blob").is_file()
    assert len(left) == 2 and [n for n in left if n.startswith("elsewhere.")]  # other host
    assert not tmp.exists() and mine.exists()


def test_nothing_is_written_outside_out(slides: list[Path], tmp_path: Path) -> None:
    home, tmp, out = tmp_path / "home", tmp_path / "t", tmp_path / "out"
    home.mkdir()
    tmp.mkdir()
    env = _env(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local"),
               XDG_STATE_HOME=str(home / ".state"), XDG_RUNTIME_DIR=str(home / "run"),
               TMPDIR=str(tmp))
    for var in ("ORT_DISABLE_TELEMETRY", "WSI_ASSIST_PATHCLIP"):
        env.pop(var, None)
    r = subprocess.run(_cli("run", str(slides[0]), "-o", str(out), "--device", "cpu"),
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads((out / "s0" / "done.json").read_text())
    assert "submodels" in done["summary"] and "report" in done["summary"]  # onnxruntime ran
    if shutil.which("chromium"):
        assert (out / "s0" / "report.pdf").is_file()  # Chromium ran
    assert list(home.rglob("*")) == [] and list(tmp.rglob("*")) == []
    assert not [p for p in (out / ".work").rglob("*") if p.is_file()]


#: Python exception class names, and struct.error as it prints.
EXCEPTION = re.compile(r"\b\w*(Error|Exception)\b|(^|\W)error: |truth value|"
                       r"out of range|unpack requires|object has no attribute")


def _fuzzed(src: list[Path], out: Path, n: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    made = []
    for f in src:
        data = f.read_bytes()
        suffix = ".ome.tif" if f.name.endswith(".ome.tif") else f.suffix
        for k in range(n):
            b = bytearray(data)
            mode = rng.choice(["cut", "flip", "flip", "zero"])
            if mode == "cut":
                b = b[:rng.choice([16, 256, 1024, 4096, len(b) // 3, len(b) - 1000])]
            elif mode == "flip":
                for _ in range(rng.choice([1, 4, 16])):
                    i = rng.randrange(min(len(b), 4096)) if rng.random() < 0.7 else \
                        rng.randrange(len(b))
                    b[i] = rng.randrange(256)
            else:
                i = rng.randrange(len(b))
                b[i:i + 4096] = bytes(len(b[i:i + 4096]))
            p = out / f"{f.name.split('.')[0]}-{k}-{mode}{suffix}"
            p.write_bytes(bytes(b))
            made.append(p)
    return made


def test_failure_reasons_are_words_naming_the_file(shared_slides: Path, tmp_path: Path) -> None:
    src = [shared_slides / n for n in ("CMU-1-Small-Region.svs", "HE_example.ome.tif",
                                       "OS-2-vsi-Ki67.ome.tif")]
    src += sorted((shared_slides / "bad").iterdir())
    d = tmp_path / "in"
    d.mkdir()
    made = _fuzzed(src, d, 5, seed=14)
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(d), "-o", str(out), "--mpp", "0.5"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    rows = manifest(out)
    assert len(rows) == len(made)
    failed = [row for row in rows.values() if row["status"] == "failed"]
    assert len(failed) >= len(made) // 2
    for row in failed:
        err = row["error"]
        assert "\n" not in err and row["path"] in err, row
        assert not EXCEPTION.search(err), err


def _damage_tiles(path: Path, chunks: list[int]) -> list[tuple[int, int]]:
    """Damage level-0 JPEG tiles in place, decodably: the first loses its end-of-image
    marker, the third gets a stray APP1 marker inside its scan data, the fourth a
    restart marker (no restart interval is defined), the others a hole of zeros.
    Returns their (row, column) in tiles."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        per_row = page.chunked[1]
    with path.open("r+b") as f:
        for k, i in enumerate(chunks):
            if k == 0:
                f.seek(offsets[i] + counts[i] - 2)
                f.write(b"\0\0")
            elif k in (2, 3):  # an APP1 or RST3 marker: decodes, with a warning
                f.seek(offsets[i] + counts[i] // 2)
                f.write(b"\xff\xe1" if k == 2 else b"\xff\xd3")
            else:
                f.seek(offsets[i] + counts[i] // 2)
                f.write(bytes(64))
    return [divmod(i, per_row) for i in chunks]


def _overlapping(grid: TileGrid, chunks: list[tuple[int, int]], px: int) -> np.ndarray:
    """Which grid tiles overlap any of the level-0 ``chunks`` (row, column) of ``px``."""
    xy, r = grid.level_coords(), grid.read_px
    return np.array([any(x < (c + 1) * px and x + r > c * px and y < (rw + 1) * px
                         and y + r > rw * px for rw, c in chunks) for x, y in xy])


def _damaged_flags(path: Path, grid: TileGrid) -> list[bool]:
    """The stream's damaged flag of every tile of ``grid``, in grid order."""
    from wsi_assist.stream import stream

    return np.concatenate([b.damaged if b.damaged is not None else np.zeros(len(b), bool)
                           for b in stream(path, grid)]).tolist()


@pytest.mark.parametrize(("target_mpp", "scale"), [(0.25, 1), (0.5, 2), (1.0, 4)])
def test_damaged_chunks_flag_the_same_tiles_decoded_in_full_or_scaled(
        tmp_path: Path, target_mpp: float, scale: int) -> None:
    """In full (the byte search of jpeg_damaged) or at reduced scale in the DCT domain
    (libjpeg's strict warnings plus jpeg_damaged_silently), the same tiles are flagged:
    those holding a chunk cut off its end marker, holed, or with a stray marker."""
    from wsi_assist.chunks import SOURCES
    from wsi_assist.stream import reduced_source
    from wsi_assist.tiling import grid

    path = write_slide(tmp_path / "s.svs", default_slide(1024, 768, seed=4), kind="svs",
                       mpp=0.25)
    clean = tmp_path / "clean.svs"
    shutil.copy(path, clean)
    bad = _damage_tiles(path, [5, 6, 9, 11])
    info = describe(path)
    g = grid(info, shapely.box(0, 0, info.width, info.height),
             TilingParams(target_mpp=target_mpp, tile_px=64, min_tissue=0.0))
    assert 0 < _overlapping(g, bad, 256).sum() < len(g)
    for slide, chunks in ((clean, []), (path, bad)):
        with SOURCES.lease(str(slide), g.level, "tifffile") as src:
            reduced, _, px = reduced_source(src, g)
            assert g.read_px // px == scale and (reduced is src) == (scale == 1)
        assert _damaged_flags(slide, g) == _overlapping(g, chunks, 256).tolist(), slide


@pytest.mark.parametrize("target_mpp", [0.25, 0.5])
def test_blank_tiles_under_optimised_huffman_tables_are_not_damaged(
        tmp_path: Path, target_mpp: float) -> None:
    """Glass tiles JPEG-encoded with Huffman tables optimised for them are long runs of
    zero bytes (uniform blocks are zero bits), which is valid data: not flagged damaged,
    in full or at reduced scale, while a hole in a tissue tile of the same slide is."""
    import tifffile

    from wsi_assist.tiling import grid

    rgb = default_slide(1024, 768, seed=4).render(0, 0, 1024, 768, 1.0, 1.0)
    rgb[:, :512] = 243  # glass: the left two columns of 256 px tiles
    path = tmp_path / "optimised.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
                 compressionargs={"level": 90, "optimize": True},
                 description="Aperio Image Library v12.0.15\r\n1024x768 (256x256) JPEG/RGB "
                             "Q=90|AppMag = 40|MPP = 0.25")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        glass = [path.read_bytes()[o:o + n] for o, n in zip(
            page.dataoffsets[:2], page.databytecounts[:2], strict=True)]
        offset, count = page.dataoffsets[2], page.databytecounts[2]
    assert all(ZERO_RUN in t for t in glass)  # what a hole looks like, and valid
    info = describe(path)
    g = grid(info, shapely.box(0, 0, info.width, info.height),
             TilingParams(target_mpp=target_mpp, tile_px=64, min_tissue=0.0))
    assert not any(_damaged_flags(path, g))
    with path.open("r+b") as f:  # a hole in the tissue tile at row 0, column 2
        f.seek(offset + count // 2)
        f.write(bytes(64))
    assert _damaged_flags(path, g) == _overlapping(g, [(0, 2)], 256).tolist()


def test_damaged_jpeg_tiles_are_counted_in_qc_and_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_assist.chunks import jpeg_damaged
    from wsi_assist.store import SlideStore

    clean = write_slide(tmp_path / "clean.svs", default_slide(1024, 768, seed=4), kind="svs")
    hurt = tmp_path / "hurt.svs"
    shutil.copy(clean, hurt)
    bad = _damage_tiles(hurt, [5, 6, 9])  # 4 x 3 tiles of 256 px: inside the tissue
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(clean), str(hurt), "-o", str(out), "--config", str(cfg),
                            "--stages", "tissue,tiles,report"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "clean" / "done.json").read_text())[
        "summary"]["tiles"]["damaged_tiles"] == 0
    expected = int(_overlapping(SlideStore(out / "hurt", "r").read_grid(), bad, 256).sum())
    assert expected > 0
    done = json.loads((out / "hurt" / "done.json").read_text())
    assert done["summary"]["tiles"]["damaged_tiles"] == expected
    assert SlideStore(out / "hurt", "r").read_damaged_tiles() == expected
    report = json.loads((out / "hurt" / "report.json").read_text())
    assert report["qc"]["damaged_tiles"] == expected
    assert "Damaged tiles" in (out / "hurt" / "report.html").read_text()
    assert f"| Damaged tiles | {expected} " in (out / "hurt" / "report.md").read_text()
    # with the built-in nuclei the tiles are cut out of haloed blocks: still the same
    # tiles, not every tile of a damaged block
    from wsi_assist.stages import tilepass

    cut = []
    crops = tilepass._Crops.add
    monkeypatch.setattr(tilepass._Crops, "add", lambda self, batch: (
        cut.append(batch.damaged is not None), (yield from crops(self, batch)))[1])
    both = tmp_path / "both"
    r = runner.invoke(app, ["run", str(hurt), "-o", str(both), "--config", str(cfg),
                            "--stages", "tissue,tiles,submodels"])
    assert r.exit_code == 0, r.output
    store = SlideStore(both / "hurt", "r")
    assert any(cut) and expected < len(store.read_grid())  # damaged blocks, not all bad
    assert store.read_damaged_tiles() == expected
    # what is flagged is what libjpeg warns about; undamaged tiles are never flagged
    import tifffile

    with tifffile.TiffFile(clean) as tf:
        page = tf.pages[0]
        data = clean.read_bytes()
        tiles = [data[o:o + n] for o, n in zip(page.dataoffsets, page.databytecounts,
                                               strict=True)]
    assert not any(jpeg_damaged(t) for t in tiles)
    t, h = tiles[0], len(tiles[0]) // 2
    assert jpeg_damaged(t[:h]) and jpeg_damaged(t[:-2] + b"\0\0")
    assert jpeg_damaged(t[:h] + b"\xff\xc4" + t[h + 2:])  # a marker inside the scan
    assert jpeg_damaged(t[:h] + b"\xff\xd3" + t[h + 2:])  # a restart, with no interval
    import io

    from PIL import Image

    restarted = io.BytesIO()  # restart markers where a restart interval is defined
    Image.open(io.BytesIO(t)).save(restarted, "JPEG", quality=90, restart_marker_rows=1)
    assert b"\xff\xdd" in restarted.getvalue() and b"\xff\xd0" in restarted.getvalue()
    assert not jpeg_damaged(restarted.getvalue())
    # the header memo answers as a fresh parse does, warm or cold, header damaged or not
    from wsi_assist import chunks

    variants = [*tiles, t[:h], t[:-2] + b"\0\0", t[:h] + b"\xff\xc4" + t[h + 2:],
                t[:2] + b"\0" + t[3:], t[:40], t[:-2]]
    cold = []
    for v in variants:
        chunks._SCAN_HEADERS.clear()
        cold.append(jpeg_damaged(v))
    assert [jpeg_damaged(v) for v in variants] == cold
    assert cold[:len(tiles)] == [False] * len(tiles) and all(cold[len(tiles):])


def test_what_a_user_meets_is_a_usage_error_before_any_slide(slides: list[Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(slides[0]), "-o", str(out), "--pathclip", "/nope.pt"])
    assert r.exit_code == 2 and "/nope.pt: model file not found" in r.stderr
    assert not (out / "manifest.csv").exists() and not (out / "s0").exists()
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ntask: nonsense\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"submodels:\n  specs: [{spec}]\n")
    r = runner.invoke(app, ["run", str(slides[0]), "-o", str(out), "--config", str(cfg)])
    assert r.exit_code == 2 and f"{spec}: invalid sub-model spec" in r.stderr
    import torch

    if not torch.cuda.is_available():
        r = runner.invoke(app, ["run", str(slides[0]), "-o", str(out), "--device", "cuda",
                                *TILE])
        assert r.exit_code == 2 and "no CUDA device" in r.stderr
    r = runner.invoke(app, ["info", str(slides[0]), "--mpp", "-1"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\ns0.svs,0.5\nnot-a-slide.svs,0.5\n")
    r = runner.invoke(app, ["run", str(slides[0]), "-o", str(out), "--mpp-csv", str(table),
                            *TILE])
    assert r.exit_code == 0 and "not-a-slide.svs" in r.stderr and "match no input" in r.stderr


def test_report_rebuilds_every_slide_of_out(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n")
    r = runner.invoke(app, ["run", str(slides[0]), str(slides[1]), "-o", str(out),
                            "--config", str(cfg), "--stages", "tissue,tiles"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "s0" / "report.json").is_file() and (out / "s1" / "report.json").is_file()
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
