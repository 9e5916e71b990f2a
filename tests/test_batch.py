"""Batch runs: ids, failure isolation, resume, crash safety, concurrency, Dask."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from wsi_assist import batch, config
from wsi_assist.cli import app
from wsi_assist.synthetic import default_slide, write_slide

runner = CliRunner()


def open_store(path: Path, mode: str) -> zarr.Group:
    """slide.zarr as written, read with zarr alone (the documented layout)."""
    return zarr.open_group(str(path), mode=mode)


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six small synthetic slides with different content."""
    d = tmp_path_factory.mktemp("small")
    return [write_slide(d / f"s{i}.svs", default_slide(1024, 768, seed=i), kind="svs")
            for i in range(6)]


@pytest.fixture
def mixed(tmp_path: Path, small_slides: list[Path], shared_slides: Path) -> Path:
    """Good slides, duplicate stems in two subfolders, odd names, and every bad file."""
    root = tmp_path / "in"
    for sub, src in (("a", small_slides[0]), ("b", small_slides[1])):
        (root / sub).mkdir(parents=True)
        shutil.copy(src, root / sub / "case.svs")
    shutil.copy(small_slides[2], root / "Ünïcode slide #1.svs")
    shutil.copytree(shared_slides / "bad", root / "bad")
    (root / "empty.svs").write_bytes(b"")
    return root


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_slide_ids_unique_and_safe(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs", tmp_path / "y z é.svs",
             tmp_path / "..svs"]
    ids = batch.slide_ids(paths, [tmp_path])
    assert len(set(ids.values())) == 4
    assert ids[paths[0]].startswith("x-") and ids[paths[1]].startswith("x-")
    assert ids[paths[2]] == "y z é" and ids[paths[3]] == "slide"
    assert batch.slide_ids(paths, [tmp_path]) == ids  # stable
    with pytest.raises(Exception, match="outside the output folder"):
        batch.inside(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere")


@pytest.mark.real_slides
def test_mixed_folder_isolates_failures(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(mixed), "-o", str(out)])
    assert r.exit_code == 1, r.output
    rows = manifest(out)
    status = {Path(row["path"]).name: row for row in rows}
    assert sum(row["status"] == "done" for row in rows) == 3
    assert sum(row["status"] == "failed" for row in rows) == 6
    assert len({row["slide_id"] for row in rows}) == len(rows)
    assert (out / "Ünïcode slide #1" / "done.json").exists()
    for name in ("unreadable.svs", "broken.svs", "empty.svs", "jpeg-named.mrxs"):
        row = status[name]
        assert row["stage"] == "open" and name in row["error"] and "\n" not in row["error"]
    assert "Traceback" not in r.output and "failed [open]" in r.stderr
    assert "Traceback" in (out / "run.log").read_text()
    assert {"path", "slide_id", "status", "error", "stage", "n_tiles", "seconds",
            "tiles_per_s", "warnings"} == set(rows[0])
    assert (out / "config.yaml").exists()


def test_resume_skips_done_and_reruns_changed_stages(small_slides: list[Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    slide = small_slides[0]
    assert runner.invoke(app, ["run", str(slide), "-o", str(out), "--stages", "tissue,tiles"]).exit_code == 0
    done1 = json.loads((out / "s0" / "done.json").read_text())
    r = runner.invoke(app, ["run", str(slide), "-o", str(out), "--stages", "tissue,tiles"])
    assert r.exit_code == 0 and manifest(out)[0]["status"] == "skipped"
    assert json.loads((out / "s0" / "done.json").read_text()) == done1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  tile_px: 256\n")
    assert runner.invoke(app, ["run", str(slide), "-o", str(out), "--stages", "tissue,tiles", "--config", str(cfg)]
                         ).exit_code == 0
    done2 = json.loads((out / "s0" / "done.json").read_text())
    assert set(done2["seconds"]) == {"open", "tiles"}  # tissue kept, tiles redone
    assert done2["stages"]["tissue"] == done1["stages"]["tissue"]
    assert done2["stages"]["tiles"] != done1["stages"]["tiles"]
    assert open_store(out / "s0" / "slide.zarr", "r").attrs["tile_px"] == 256
    r = runner.invoke(app, ["run", str(slide), "-o", str(out), "--stages", "tissue,tiles", "--config", str(cfg),
                            "--force"])
    assert set(json.loads((out / "s0" / "done.json").read_text())["seconds"]) == \
        {"open", "tissue", "tiles"}


def test_unwritable_out_is_a_usage_error(small_slides: list[Path], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["run", str(small_slides[0]), "-o", str(blocker / "out")])
    assert r.exit_code == 2 and "not writable" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out(small_slides: list[Path], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = runner.invoke(app, ["run", str(small_slides[0]), "-o", str(ro)])
    assert r.exit_code == 2 and "not writable" in r.stderr


def test_bad_config_and_flags_are_usage_errors(small_slides: list[Path], tmp_path: Path
                                               ) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  tile_px: -3\n")
    r = runner.invoke(app, ["run", str(small_slides[0]), "-o", str(tmp_path / "o"),
                            "--config", str(cfg)])
    assert r.exit_code == 2 and "tiling.tile_px" in r.stderr
    r = runner.invoke(app, ["run", str(small_slides[0]), "-o", str(tmp_path / "o"),
                            "--stages", "tissue,wings"])
    assert r.exit_code == 2 and "unknown stage 'wings'" in r.stderr


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_assist", *args]


def _results(out: Path) -> dict[str, tuple]:
    res = {}
    for d in sorted(p for p in out.iterdir() if (p / "done.json").exists()):
        g = open_store(d / "slide.zarr", "r")
        feats = json.loads((d / "tissue.geojson").read_text())["features"]
        for f in feats:
            f.pop("id")
        res[d.name] = (np.asarray(g["coords"][...]), np.asarray(g["tissue_fraction"][...]),
                       feats)
    return res


def _assert_same(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])
        assert a[k][2] == b[k][2]


@pytest.mark.slow
def test_sigkill_then_resume_equals_clean_run(small_slides: list[Path], tmp_path: Path
                                              ) -> None:
    src = small_slides[0].parent
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(_cli("run", str(src), "-o", str(clean), "--quiet"), check=True)
    killed_mid_run = False
    for delay in (0.0, 0.8, 1.6):  # kill at different moments, resuming each time
        p = subprocess.Popen(_cli("run", str(src), "-o", str(crashed), "--quiet"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay + 1.2)
        if p.poll() is None:
            killed_mid_run = True
        p.send_signal(signal.SIGKILL)
        p.wait()
        for d in crashed.glob("*/"):
            if d.name.startswith("."):
                continue
            assert (d / "done.json").exists(), f"{d} visible without done.json"
    assert killed_mid_run
    subprocess.run(_cli("run", str(src), "-o", str(crashed), "--quiet"), check=True)
    _assert_same(_results(clean), _results(crashed))
    # the killed runs' work folders and temporary files are gone
    assert not list((crashed / ".work").iterdir())
    assert not [p for p in crashed.rglob(".*.tmp*")]


@pytest.mark.slow
def test_concurrent_runs_never_share_a_slide(small_slides: list[Path], tmp_path: Path
                                             ) -> None:
    src, out = small_slides[0].parent, tmp_path / "out"
    out.mkdir()
    procs = [subprocess.Popen(_cli("run", str(src), "-o", str(out), "--quiet"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(3)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0, 0]
    starts = [line.split("start ", 1)[1].split(" ")[0]
              for line in (out / "run.log").read_text().splitlines() if " start " in line]
    assert sorted(starts) == sorted(f"s{i}" for i in range(6))  # each slide processed once
    assert not list((out / ".locks").glob("*.lock"))
    # the manifest written last describes OUT as it is: every slide done, its numbers
    for row in manifest(out):
        assert row["status"] in ("done", "skipped") and row["error"] == "", row
        done = json.loads((out / row["slide_id"] / "done.json").read_text())
        assert int(row["n_tiles"]) == done["n_tiles"]


def test_stale_lock_from_dead_process_is_taken_over(tmp_path: Path) -> None:
    from wsi_assist import locks

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    path = tmp_path / "x.lock"
    import socket

    path.write_text(json.dumps({"host": socket.gethostname(), "pid": p.pid, "since": 0}))
    lock = locks.acquire(path)
    assert isinstance(lock, locks.Lock) and lock.pid == os.getpid()
    assert locks.acquire(path) == f"host {socket.gethostname()} pid {os.getpid()}"
    lock.release()
    assert not path.exists()


@pytest.mark.slow
def test_local_cluster_gives_same_results(small_slides: list[Path], tmp_path: Path) -> None:
    src = small_slides[0].parent
    cfg = config.load()
    local = batch.run_batch([src], tmp_path / "local", cfg)
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dist = batch.run_batch([src], tmp_path / "dist", cfg, client=client)
    assert [r.status for r in local] == [r.status for r in dist] == ["done"] * 6
    _assert_same(_results(tmp_path / "local"), _results(tmp_path / "dist"))


def test_second_run_says_why_it_skipped_and_the_index_shows_done(
        small_slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", str(small_slides[0]), str(small_slides[1]), "-o", str(out), "--stages",
            "tissue,tiles,report"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "0 done, 2 skipped, 0 failed" in r.stdout
    assert "skipped (already done; --force to redo): s0, s1" in r.stdout
    assert [row["status"] for row in manifest(out)] == ["skipped", "skipped"]
    page = (out / "index.html").read_text(encoding="utf-8")
    cells = [c.split("</td>")[0] for c in page.split('<td class="')[1:]]
    assert len(cells) == 2 and all(c.startswith('done">done') and "earlier run" in c
                                   for c in cells), cells
    assert ">skipped<" not in page


def test_not_run_and_dask_lines_are_said_once_per_batch(small_slides: list[Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("WSI_ASSIST_PATHCLIP", None)
    p = subprocess.run(_cli("run", *map(str, small_slides[:2]), "-o", str(out), "--stages",
                            "tissue,tiles,embed,zeroshot,caption", "--workers", "2",
                            "--device", "auto"), check=False,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    for stage in ("embed", "zeroshot", "caption"):
        said = [line for line in lines if f"{stage} not run" in line]
        assert len(said) == 1 and "on all slides" in said[0], said
    assert not [line for line in lines if line.startswith("INFO distributed")], lines
    assert sum("Dask: local cluster of 2 worker" in line for line in lines) == 1
    # no stage of this run puts a model on the device: auto is not even resolved (no
    # torch import), in this process or the workers, and no fallback line is said
    assert not [line for line in lines if "--device auto" in line], lines
    assert not [line for line in lines if "EP Error" in line or "libcublas" in line]
    done = json.loads((out / "s0" / "done.json").read_text())
    assert done["device"] == "cpu"


def test_auto_device_is_resolved_only_when_a_stage_puts_a_model_on_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from wsi_assist import stages

    asked: list[str] = []
    monkeypatch.setattr(stages, "resolve_device",  # a machine with a GPU
                        lambda spec: asked.append(spec) or ("cuda" if spec == "auto" else spec))
    weights = tmp_path / "pathclip-base.pt"
    onnx = {"submodels": {"specs": [str(tmp_path / "cells.yaml")]}}
    for sections, want in (({}, "cpu"), ({"embed": {"pathclip": str(weights)}}, "cuda"),
                           ({"caption": {"model": str(tmp_path / "llava")}}, "cuda"),
                           (onnx, "cuda"), ({"submodels": {"specs": ["nuclei"]}}, "cpu")):
        cfg = config.override(config.load(), parallelism={"device": "auto"}, **sections)
        asked.clear()
        assert stages.run_device(cfg) == want, sections
        assert asked == (["auto"] if want == "cuda" else [])
        # the stage that would use it is not among those to run: nothing to resolve
        tile_only = config.from_dict({**cfg.to_dict(), "stages": "tissue,tiles"})
        assert stages.run_device(tile_only) == "cpu"
    explicit = config.override(config.load(), parallelism={"device": "cuda:1"})
    assert stages.run_device(explicit) == "cuda:1"  # a device asked for is kept


@pytest.mark.slow
def test_ctrl_c_twice_still_writes_manifest_and_index(small_slides: list[Path],
                                                      tmp_path: Path) -> None:
    # a small slide, then larger ones that take seconds each: the second Ctrl-C lands
    # while one of them is being processed, however fast the machine
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(small_slides[0], src / "s0.svs")
    for i in (1, 2):
        write_slide(src / f"s{i}.svs", default_slide(4096, 3072, seed=i), kind="svs")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n")
    p = subprocess.Popen(_cli("run", str(src), "-o", str(out), "--config", str(cfg)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240

    def second_started() -> bool:  # the first slide is done and the second has started
        log = out / "run.log"
        return bool(list(out.glob("s*/done.json"))) and log.is_file() and \
            "start s1 " in log.read_text(encoding="utf-8", errors="replace")

    while not second_started() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)  # abort the slide being processed
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    rows = manifest(out)
    done = [r for r in rows if r["status"] == "done"]
    assert done and all((out / r["slide_id"] / "done.json").is_file() for r in done)
    cut = [r for r in rows if r["status"] == "failed"]
    assert len(cut) == 1 and "interrupted by Ctrl-C" in cut[0]["error"], rows
    assert not (out / cut[0]["slide_id"]).exists()
    assert len(rows) < 6 and "Traceback" not in err
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f">{r['slide_id']}<" in page for r in done)
    assert "interrupted: finished slides are kept" in err


def test_chromium_folders_of_dead_runs_are_removed_from_tmpdir(
        small_slides: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()

    def profile(name: str, lock: str | None, age_s: float = 0.0) -> Path:
        d = tmp / f"wsi-assist-chromium-{name}"
        (d / "Default").mkdir(parents=True)
        if lock is not None:
            (d / "SingletonLock").symlink_to(lock)
        if age_s:
            os.utime(d, (time.time() - age_s, time.time() - age_s))
        return d

    sock = tmp / "org.chromium.Chromium.abc123"
    sock.mkdir()
    gone = [profile("dead", f"{host}-{dead.pid}"), profile("old", None, age_s=3600), sock]
    (gone[0] / "SingletonSocket").symlink_to(sock / "SingletonSocket")
    kept = [profile("live", f"{host}-{os.getpid()}"), profile("young", None),
            profile("other-host", f"elsewhere.example-{dead.pid}")]
    other = tmp / "org.chromium.Chromium.someone-elses"
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    r = runner.invoke(app, ["run", str(small_slides[0]), "-o", str(tmp_path / "out"),
                            "--stages", "tissue"])
    assert r.exit_code == 0, r.output
    assert [p.exists() for p in gone] == [False] * 3
    assert all(p.is_dir() for p in [*kept, other])
