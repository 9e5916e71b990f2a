"""The commands through typer's CliRunner: info, tile, demo, and error reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from wsi_assist.cli import app
from wsi_assist.store import SlideStore

runner = CliRunner()
INFO_KEYS = {"path", "ok", "error", "format", "vendor", "width", "height", "level_count",
             "level_downsamples", "mpp", "mpp_source", "objective_power", "layout", "dtype",
             "channels"}


def open_store(path: Path, mode: str) -> zarr.Group:
    """slide.zarr as written, read with zarr alone (the documented layout)."""
    return zarr.open_group(str(path), mode=mode)


def test_info_json(svs_slide: Path, nompp_slide: Path) -> None:
    r = runner.invoke(app, ["info", str(svs_slide), str(nompp_slide), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [set(row) for row in rows] == [INFO_KEYS, INFO_KEYS]
    assert rows[0]["mpp_source"] == "metadata" and rows[1]["mpp_source"] is None


def test_info_exit_2_with_one_line_per_bad_file(svs_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    r = runner.invoke(app, ["info", str(svs_slide), str(bad)])
    assert r.exit_code == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "bad.svs" in err[0] and "Traceback" not in r.output


def test_debug_shows_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    r = runner.invoke(app, ["--debug", "info", str(bad)])
    assert r.exit_code != 0 and r.exception is not None


def test_tile_writes_layout(svs_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(svs_slide), "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = out / "aperio"
    for name in ("thumbnail.png", "tissue.geojson", "slide.zarr", "done.json"):
        assert (d / name).exists(), name
    g = open_store(d / "slide.zarr", "r")
    grid = SlideStore(d, "r").read_grid()
    assert len(grid) > 10 and grid.coords.dtype == np.int64
    assert {"mpp", "mpp_source", "tile_px", "target_mpp", "level"} <= set(g.attrs)
    assert g.attrs["mpp_source"] == "metadata"
    feats = json.loads((d / "tissue.geojson").read_text())["features"]
    assert len(feats) == 3
    props = feats[0]["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"]["name"] == "Tissue"
    assert props["measurements"]["Area um^2"] > 0


def test_tile_without_mpp_fails_clearly_then_override_works(nompp_slide: Path,
                                                            tmp_path: Path) -> None:
    r = runner.invoke(app, ["tile", str(nompp_slide), "-o", str(tmp_path / "a")])
    assert r.exit_code == 1
    assert "--mpp X or --mpp-csv FILE" in r.stderr
    r = runner.invoke(app, ["tile", str(nompp_slide), "-o", str(tmp_path / "b"),
                            "--mpp", "0.5"])
    assert r.exit_code == 0, r.output
    g = open_store(tmp_path / "b" / "nompp" / "slide.zarr", "r")
    assert g.attrs["mpp_source"] == "override"


def test_blank_slide_gives_zero_tiles_not_a_crash(blank_slide: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["tile", str(blank_slide), "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert len(SlideStore(tmp_path / "blank", "r").read_grid()) == 0


def test_one_by_one_slide(tmp_path: Path) -> None:
    import tifffile

    p = tmp_path / "dot.tif"
    tifffile.imwrite(p, np.full((1, 1, 3), 200, np.uint8), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    r = runner.invoke(app, ["tile", str(p), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert len(SlideStore(tmp_path / "o" / "dot", "r").read_grid()) == 0


def test_demo(tmp_path: Path) -> None:
    r = runner.invoke(app, ["demo", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "synthetic" in r.stdout
    done = json.loads((tmp_path / "results" / "synthetic-demo" / "done.json").read_text())
    assert done["info"]["synthetic"] is True
    assert done["summary"]["tiles"]["n_tiles"] > 20
    # it ends with the files to open, which exist
    last = r.stdout.strip().splitlines()[-3:]
    report = tmp_path.resolve() / "results" / "synthetic-demo" / "report.html"
    assert f"open the report: {report}" in last
    assert f"open the index of the batch: {tmp_path.resolve() / 'results' / 'index.html'}" \
        in last[-1]
    # the demo puts no model on a device (no weights): auto resolves to the CPU unasked
    assert report.is_file() and done["device"] == "cpu"


@pytest.mark.real_slides
def test_tile_over_shared_folder_isolates_bad_files(shared_slides: Path, tmp_path: Path
                                                    ) -> None:
    r = runner.invoke(app, ["tile", str(shared_slides), "-o", str(tmp_path)])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    good = sorted(p.name for p in shared_slides.glob("*") if p.suffix in (".svs", ".tif", ".ndpi"))
    assert sum(",done," in line for line in lines) == len(good) >= 3
    assert sum(",failed," in line for line in lines) == 5


def test_tile_reads_every_tile_for_quality_scores(svs_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, ["tile", str(svs_slide), "-o", str(out)]).exit_code == 0
    g = open_store(out / "aperio" / "slide.zarr", "r")
    qc = np.asarray(g["tile_qc"][...])
    n = len(SlideStore(out / "aperio", "r").read_grid())
    assert qc.shape == (n, 2) and list(g["tile_qc"].attrs["scores"]) == [
        "background", "focus"]
    assert ((qc[:, 0] >= 0) & (qc[:, 0] <= 1)).all() and (qc[:, 1] > 0).all()
    done = json.loads((out / "aperio" / "done.json").read_text())
    assert done["summary"]["tiles"]["tiles_per_s"] > 0


def test_models_lists_every_configured_model_and_whether_it_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import _subnets
    from random_vlm import build_llava

    from exporters.submodels import export_model, spec_dict

    monkeypatch.delenv("WSI_ASSIST_PATHCLIP", raising=False)
    export_model(_subnets.classifier(3).eval(), tmp_path, spec_dict(
        "cls", "tile-classification", ["a", "b", "c"], 64, 0.5, mean=(0, 0, 0),
        std=(1, 1, 1)), atol=1e-4)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ntask: tile-classification\nmodel: nope.onnx\n")
    vlm = build_llava(tmp_path / "vlm")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"submodels:\n  specs: [nuclei, {tmp_path / 'cls.yaml'}, {broken}]\n"
                   f"caption:\n  model: {vlm}\n")
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    lines = r.stdout.splitlines()
    assert r.exit_code == 1, r.output  # the broken spec
    assert [line.split()[0] for line in lines[-4:]] == ["sub-model"] * 3 + ["captioner"]
    nuclei, cls, bad, cap = lines[-4:]
    assert "built-in" in nuclei and "loads: cls (tile-classification), 3 classes" in cls
    assert f"{broken}: error:" in bad and "\n" not in bad
    assert f"{vlm}: checked (not loaded; --load loads it): llava, 1 weight file(s)" in cap
    r = runner.invoke(app, ["models", "--config", str(cfg), "--load"])
    assert f"{vlm}: loads: Llava" in r.stdout.splitlines()[-1]
    assert "embedder        not configured" in r.stdout
    # without the broken spec every configured model loads: exit 0
    cfg.write_text(f"submodels:\n  specs: [{tmp_path / 'cls.yaml'}]\ncaption:\n"
                   f"  model: {tmp_path / 'no-such-folder'}\n")
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    assert r.exit_code == 1 and "no-such-folder: error:" in r.stdout.splitlines()[-1]
    cfg.write_text(f"submodels:\n  specs: [{tmp_path / 'cls.yaml'}]\n")
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1].startswith("captioner       caption.model: not configured")


def test_models_checks_captioners_without_reading_their_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default check of a captioner reads its config, weight-file index and processor,
    never the weights (a 7B model would take minutes); a missing shard or a cut weight
    file is an error naming the file; --no-load only looks for the folder."""
    import transformers
    from random_vlm import build_causal_lm, build_llava
    from safetensors.torch import load_file, save_file

    monkeypatch.delenv("WSI_ASSIST_PATHCLIP", raising=False)
    vlm = build_llava(tmp_path / "vlm")
    lm = build_causal_lm(tmp_path / "lm")
    # shard the captioner as save_pretrained does for big models: an index and two files
    weights = load_file(str(vlm / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(vlm / shard), metadata={"format": "pt"})
    (vlm / "model.safetensors").unlink()
    (vlm / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))

    def no_weights(*_a: object, **_k: object) -> None:
        raise AssertionError("the cheap check loaded a model's weights")

    for cls in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", no_weights)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"submodels:\n  specs: [nuclei]\ncaption:\n  model: {vlm}\n"
                   f"  summary_model: {lm}\n")
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    cap, summ = r.stdout.splitlines()[-2:]
    assert f"{vlm}: checked (not loaded" in cap and "2 weight file(s)" in cap
    assert f"{len(names)} tensors" in cap and "chat template" in cap
    assert summ.startswith("summary model") and "llama, 1 weight file(s)" in summ
    # a cut shard, then a missing one: exit 1, the file named
    shard2 = vlm / "model-00002-of-00002.safetensors"
    data = shard2.read_bytes()
    shard2.write_bytes(data[:len(data) // 2])
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    assert r.exit_code == 1 and "model-00002-of-00002.safetensors is not a readable " \
        "safetensors file" in r.stdout.splitlines()[-2]
    shard2.unlink()
    r = runner.invoke(app, ["models", "--config", str(cfg)])
    assert r.exit_code == 1
    assert "names weight files that are missing: model-00002-of-00002.safetensors" in \
        r.stdout.splitlines()[-2]
    # --no-load: the folder exists, nothing else is looked at
    r = runner.invoke(app, ["models", "--config", str(cfg), "--no-load"])
    assert r.exit_code == 0 and "configured (not loaded)" in r.stdout.splitlines()[-2]
