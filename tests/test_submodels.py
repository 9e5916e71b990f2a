"""ONNX sub-models end to end: spec checks, sessions, decoding to level 0, de-duplication,
segmentation merging, zero-shot tile selection, QuPath detections; the stage with the
built-in nucleus analysis beside them (its own tests are in test_nuclei.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import _subnets
import numpy as np
import pytest
import yaml
from findings_helper import report_config
from scipy.spatial import cKDTree
from stage_helper import run_slide

from exporters.submodels import export_model, spec_dict
from wsi_assist import config
from wsi_assist.errors import ConfigError, ModelError
from wsi_assist.models import submodels as sm
from wsi_assist.models.submodel_spec import load_spec
from wsi_assist.report import qupath
from wsi_assist.stages import REGISTRY, SlideContext, rebuild_report
from wsi_assist.store import SlideStore, SubmodelRecord, ZeroShot
from wsi_assist.synthetic import SyntheticSlide, default_slide, write_slide

os.environ["HF_HUB_OFFLINE"] = "1"
TILE = 64  # small tiles: many nuclei are cut by tile borders


@pytest.fixture(scope="module")
def small_spec() -> SyntheticSlide:
    return default_slide(1024, 768, seed=3)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory, small_spec: SyntheticSlide) -> Path:
    return write_slide(tmp_path_factory.mktemp("sm") / "small.svs", small_spec, mpp=0.5,
                       quality=95)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny exported model per task (spec YAML paths)."""
    out = tmp_path_factory.mktemp("models")
    plain = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    specs = {
        "cls": (_subnets.classifier(3), spec_dict("cls", "tile-classification",
                                                  ["a", "b", "c"], TILE, 0.5, **plain)),
        "boxes": (_subnets.dark_boxes(), spec_dict(
            "boxes", "box-detection", ["x", "y"], TILE, 0.5, **plain,
            output={"score_threshold": 0.45, "iou_threshold": 0.2})),
        "seg": (_subnets.dark_segmenter(), spec_dict(
            "seg", "segmentation", ["background", "nucleus"], TILE, 0.5, **plain)),
        "rseg": (_subnets.RandomSegmenter(), spec_dict(
            "rseg", "segmentation", ["bg", "p", "q"], TILE, 0.5, **plain)),
        "points": (_subnets.stain_points(), _subnets.stain_points_spec()),
    }
    for model, spec in specs.values():
        export_model(model.eval(), out, spec, atol=1e-4)
    return {name: out / f"{name}.yaml" for name in specs}


class Run:
    """A slide run through some stages outside a batch; its store and sub-models."""

    def __init__(self, ctx: SlideContext) -> None:
        self.ctx, self.store = ctx, ctx.store

    def sub(self, name: str) -> SubmodelRecord:
        return self.store.read_submodel(name)


def _run(slide: Path, out: Path, specs: list[str], stages=("tissue", "tiles", "submodels"),
         **tiling) -> Run:
    cfg = config.override(config.load(), tiling={"tile_px": TILE, **tiling},
                          parallelism={"device": "cpu"}, submodels={"specs": specs})
    return Run(run_slide(slide, out, cfg, tuple(stages))[0])


@pytest.fixture(scope="module")
def points_run(small_slide: Path, models: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(small_slide, tmp_path_factory.mktemp("run"), [str(models["points"])])


def _truth_in_tiles(spec: SyntheticSlide, grid) -> np.ndarray:
    nuc = spec.nuclei()
    s = grid.size_l0
    inside = np.zeros(len(nuc), bool)
    for x, y in grid.coords:
        inside |= ((nuc[:, 0] >= x) & (nuc[:, 0] < x + s) & (nuc[:, 1] >= y)
                   & (nuc[:, 1] < y + s))
    return nuc[inside]


def test_points_match_synthetic_nuclei(points_run, small_spec) -> None:
    grid = points_run.store.read_grid()
    sg = points_run.sub("points")
    pts = np.asarray(sg.arrays["points"][...])
    truth = _truth_in_tiles(small_spec, grid)
    assert len(truth) > 150
    d, _ = cKDTree(pts).query(truth)
    r = small_spec.nucleus_radius
    assert (d < r).mean() >= 0.98  # recall: a point inside the nucleus
    assert np.median(d) < 1.0 and np.percentile(d[d < r], 95) < 3.5  # localisation, px
    # no double counts: every prediction is the nearest one of its own nucleus (matched
    # against all drawn nuclei: one whose centre lies in a tile left out is still itself)
    near = cKDTree(small_spec.nuclei()).query(pts)[1]
    assert len(np.unique(near)) >= len(pts) - 3
    # nuclei cut by a tile border (centre within one radius of it) are found exactly once
    rel = (truth - grid.coords.min(axis=0)) % grid.size_l0
    edge = truth[np.minimum(rel, grid.size_l0 - rel).min(axis=1) < small_spec.nucleus_radius]
    assert len(edge) > 50
    hits = cKDTree(pts).query_ball_point(edge, r=small_spec.nucleus_radius)
    assert np.mean([len(h) == 1 for h in hits]) >= 0.97


def test_point_store_layout_and_scores(points_run) -> None:
    sg = points_run.sub("points")
    a = dict(sg.attrs)
    assert a["task"] == "point-detection"
    assert a["classes"] == ["DAB-negative nucleus", "DAB-positive nucleus"]
    assert len(a["colors"]) == 2 and len(a["model_sha256"]) == 64
    m = sg.arrays["points"].shape[0]
    assert sg.arrays["points"].dtype == np.float64 and sg.arrays["points"].shape == (m, 2)
    assert sg.arrays["labels"].dtype == np.int16 and sg.arrays["scores"].dtype == np.float32
    assert sg.arrays["measurements"].shape == (m, 3)
    assert sg.arrays["measurements"].attrs["measurement_names"][2] == "DAB OD"
    assert sum(a["counts"].values()) == m
    # synthetic nuclei are purple (H&E): none DAB-positive; density ~ 1 per (12 um)^2
    assert a["counts"]["DAB-positive nucleus"] == 0
    dens = a["scores"]["nucleus_density_per_mm2"]
    assert 0.8 * 1e6 / 144 < dens["value"] < 1.2 * 1e6 / 144
    assert "mm^2" in dens["definition"]
    assert a["scores"]["dab_positive_percent"]["value"] == 0.0


def _detections(run: Run, name: str) -> list[dict]:
    """The QuPath detections ``annotations.geojson`` gets for sub-model ``name``."""
    return list(qupath.detection_features(run.sub(name)))


def test_detection_features_are_qupath_detections(points_run) -> None:
    sg = points_run.sub("points")
    feats = _detections(points_run, "points")
    assert len(feats) == sg.arrays["points"].shape[0]
    f = feats[0]
    p = f["properties"]
    assert p["objectType"] == "detection"
    assert p["classification"] == {"name": "DAB-negative nucleus", "color": [40, 80, 200]}
    assert set(p["measurements"]) == {"Score", "Haematoxylin OD", "Eosin OD", "DAB OD"}
    assert f["geometry"]["type"] == "Point"
    assert np.allclose(f["geometry"]["coordinates"], sg.arrays["points"][0], atol=0.5)


def test_classification_matches_direct_inference(models, small_slide, tmp_path) -> None:
    import onnxruntime as ort

    from wsi_assist.stream import stream

    run = _run(small_slide, tmp_path, [str(models["cls"])])
    sg = run.sub("cls")
    probs, labels = np.asarray(sg.arrays["probs"][...]), np.asarray(sg.arrays["labels"][...])
    grid = run.store.read_grid()
    assert probs.shape == (len(grid), 3) and labels.shape == (len(grid),)
    sess = ort.InferenceSession(str(models["cls"].with_suffix(".onnx")))
    tiles = next(iter(stream(small_slide, grid, batch_size=8))).tiles
    logits = sess.run(None, {"tiles": tiles.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs[:8], want, atol=1e-5)
    assert (labels == probs.argmax(axis=1)).all()
    assert sum(sg.attrs["counts"].values()) == len(grid)
    rebuild_report(tmp_path, report_config(include_tiles=True))
    feats = json.loads((tmp_path / "annotations.geojson").read_text())["features"]
    tiles_feats = [f for f in feats if f["properties"]["objectType"] == "tile"]
    assert len(tiles_feats) == len(grid) and tiles_feats[0]["properties"]["objectType"] == "tile"


def test_zeroshot_selection_runs_listed_classes_only(models, small_slide, tmp_path) -> None:
    base = _run(small_slide, tmp_path, [], stages=("tissue", "tiles"))
    n = len(base.store.read_grid())
    top = (np.arange(n) % 3).astype(np.int16)
    probs = np.eye(3, dtype=np.float32)[top]
    base.store.write_zeroshot(ZeroShot(classes=["tumor", "stroma", "fat"],
                                       colors=[(1, 1, 1), (2, 2, 2), (3, 3, 3)], probs=probs,
                                       top=top, uncertain=np.zeros(n, bool)))
    data = yaml.safe_load(models["cls"].read_text())
    data["tiles"] = {"zeroshot_classes": ["stroma"]}
    data["model"] = str(models["cls"].with_suffix(".onnx"))
    spec = tmp_path / "zs.yaml"
    spec.write_text(yaml.safe_dump(data))
    run = _run(small_slide, tmp_path, [str(spec)], stages=("submodels",))
    sg = run.sub("cls")
    ran = ~np.isnan(np.asarray(sg.arrays["probs"][...])[:, 0])
    assert (ran == (top == 1)).all()
    assert sg.attrs["n_tiles_run"] == int((top == 1).sum())
    assert set(np.asarray(sg.arrays["labels"][...])[~ran]) == {-1}


def test_boxes_deduplicated_across_tiles(models, small_slide, small_spec, tmp_path) -> None:
    run = _run(small_slide, tmp_path, [str(models["boxes"])])
    sg = run.sub("boxes")
    boxes = np.asarray(sg.arrays["boxes"][...])
    assert boxes.dtype == np.float64 and boxes.shape[1] == 4
    assert np.allclose(boxes[:, 2] - boxes[:, 0], 12.0)  # 12 model px = 12 level-0 px here
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    truth = _truth_in_tiles(small_spec, run.store.read_grid())
    d, _ = cKDTree(centres).query(truth)
    assert (d < small_spec.nucleus_radius).mean() >= 0.97
    near = cKDTree(truth).query(centres)[1]
    assert len(np.unique(near)) >= 0.97 * len(centres)  # border duplicates suppressed
    assert sorted(set(np.asarray(sg.arrays["labels"][...]).tolist())) <= [0, 1]


def test_segmentation_polygons_merged_across_borders(models, small_slide, small_spec,
                                                     tmp_path) -> None:
    import shapely
    from shapely.geometry import shape

    from wsi_assist.geojson import read_features

    run = _run(small_slide, tmp_path, [str(models["seg"]), str(models["rseg"])])
    a = dict(run.sub("seg").attrs)
    feats = read_features(tmp_path / a["geojson"])
    assert a["geojson"] == "findings/seg.geojson" and len(feats) == a["counts"]["nucleus"]
    polys = [shape(f["geometry"]) for f in feats]
    assert all(f["properties"]["classification"]["name"] == "nucleus" for f in feats)
    truth = _truth_in_tiles(small_spec, run.store.read_grid())
    cents = np.array([[p.centroid.x, p.centroid.y] for p in polys])
    # each nucleus one polygon: no halves left at tile borders
    inside = shapely.contains_xy(shapely.MultiPolygon(polys), truth[:, 0], truth[:, 1])
    assert inside.mean() >= 0.97
    near = cKDTree(truth).query(cents)[1]
    assert len(np.unique(near)) >= 0.97 * len(polys)
    area = np.median([p.area for p in polys])
    assert 0.6 * np.pi * 36 < area < 1.6 * np.pi * 36
    assert run.sub("rseg").attrs["task"] == "segmentation"


def test_session_created_once_and_reused(models, small_slide, tmp_path, monkeypatch) -> None:
    import onnxruntime as ort

    made = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    sm.clear_cache()
    monkeypatch.setattr(ort, "InferenceSession", counting)
    for i in range(2):
        _run(small_slide, tmp_path / str(i), [str(models["cls"])])
    # at the first load only: the model as exported (checked against the spec), then the
    # same model with its preprocessing fused in, which is the one that runs
    assert len(made) == 2 and isinstance(made[1], bytes)
    a = sm.get_submodel(models["cls"], ["CPUExecutionProvider"])
    assert a.fused and a is sm.get_submodel(models["cls"], ["CPUExecutionProvider"])
    assert len(made) == 2
    onnx_file = models["cls"].with_suffix(".onnx")  # a replaced model file is reloaded
    os.utime(onnx_file, ns=(onnx_file.stat().st_atime_ns, onnx_file.stat().st_mtime_ns + 10**9))
    assert sm.get_submodel(models["cls"], ["CPUExecutionProvider"]) is not a
    assert len(made) == 4


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_fused_preprocessing_equals_numpy(models, tmp_path, order) -> None:
    data = yaml.safe_load(models["cls"].read_text())
    data.update(model=str(models["cls"].with_suffix(".onnx")))
    data["input"].update(channel_order=order, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    spec = tmp_path / "v.yaml"
    spec.write_text(yaml.safe_dump(data))
    fused = sm.Submodel.load(spec, ["CPUExecutionProvider"])
    plain = sm.Submodel.load(spec, ["CPUExecutionProvider"], fuse=False)
    assert fused.fused and not plain.fused
    tiles = np.random.default_rng(1).integers(0, 256, (4, TILE, TILE, 3), dtype=np.uint8)
    assert fused.prepare(tiles, TILE).dtype == np.uint8
    assert plain.prepare(tiles, TILE).dtype == np.float32
    a = fused.run(fused.prepare(tiles, TILE))["output"]
    b = plain.run(plain.prepare(tiles, TILE))["output"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_spec_contradicting_model_is_refused(models, tmp_path) -> None:
    data = yaml.safe_load(models["cls"].read_text())
    data["model"] = str(models["cls"].with_suffix(".onnx"))
    for change, needle in ((("input", "tile_px", 96), "tile_px 96"),
                           (("output", "classes", ["a", "b"]), "2 classes"),
                           (("input", "dtype", "uint8"), "dtype uint8"),
                           (("task", None, "point-detection"), "needs outputs")):
        bad = yaml.safe_load(yaml.safe_dump(data))
        sec, key, value = change
        if key is None:
            bad[sec] = value
        else:
            bad[sec][key] = value
            if key == "classes":
                bad["output"]["colors"] = bad["output"]["colors"][:2]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ModelError, match=needle) as e:
            sm.Submodel.load(path, ["CPUExecutionProvider"])
        assert "cls.onnx" in str(e.value)


def test_missing_or_broken_model_file(models, tmp_path) -> None:
    data = yaml.safe_load(models["cls"].read_text())
    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump(data))  # model path now relative to tmp_path: absent
    with pytest.raises(ModelError, match="not found"):
        sm.Submodel.load(spec, ["CPUExecutionProvider"])
    (tmp_path / "cls.onnx").write_bytes(models["cls"].with_suffix(".onnx").read_bytes()[:500])
    with pytest.raises(ModelError, match="not a loadable ONNX"):
        sm.Submodel.load(spec, ["CPUExecutionProvider"])
    with pytest.raises(ModelError, match="colors"):
        data["output"]["colors"] = [[1, 2, 3]]
        spec.write_text(yaml.safe_dump(data))
        load_spec(spec)


def test_config_and_skips(tmp_path) -> None:
    cfg = config.load()
    assert cfg.submodels.specs == ("nuclei",)
    with pytest.raises(ConfigError, match="submodels.providers"):
        config.override(config.load(), submodels={"providers": ["rocm"]})
    assert sm.choose_providers(None, "cpu") == ["CPUExecutionProvider"]
    assert sm.choose_providers(("cpu",), "cuda") == ["CPUExecutionProvider"]
    off = config.override(cfg, submodels={"specs": []})
    stage = REGISTRY["submodels"]
    assert not stage.configured(None, submodels=off.submodels, nuclei=off.nuclei)
    assert "submodels.specs" in stage.how_to_enable


def test_copied_spec_finds_its_model(models, tmp_path) -> None:
    """A spec loads from a copied folder (model path relative to the YAML)."""
    for f in ("points.yaml", "points.onnx"):
        shutil.copy(models["points"].parent / f, tmp_path / f)
    sub = sm.Submodel.load(tmp_path / "points.yaml", ["CPUExecutionProvider"])
    assert sub.spec.model_path == (tmp_path / "points.onnx").resolve()
    assert sub.model_px(224, 0.25) == 112  # dynamic size: resized to the spec's 0.5 um/px


def test_run_cli_with_providers(small_slide, tmp_path) -> None:
    from typer.testing import CliRunner

    from wsi_assist.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(small_slide), "-o", str(out), "--stages",
                                   "tissue,tiles,submodels", "--providers", "cpu"])
    assert res.exit_code == 0, res.output
    sub = SlideStore(out / small_slide.stem, "r").read_submodel("nuclei")
    assert sub.attrs["counts"]["Nucleus"] > 150
    bad = CliRunner().invoke(app, ["run", str(small_slide), "-o", str(out), "--providers",
                                   "rocm"])
    assert bad.exit_code == 2 and "submodels.providers" in bad.output


def test_slide_without_tiles_gives_empty_findings(blank_slide, models, tmp_path) -> None:
    run = _run(blank_slide, tmp_path, ["nuclei", str(models["points"]), str(models["cls"])])
    sg = run.sub("nuclei")
    assert sg.arrays["points"].shape == (0, 2) and sg.attrs["counts"] == {"Nucleus": 0}
    assert sg.attrs["scores"]["positive_percent"]["value"] is None
    assert list(qupath.nucleus_features(sg)) == []
    assert run.sub("points").attrs["scores"]["dab_positive_percent"]["value"] is None
    assert run.sub("cls").arrays["probs"].shape == (0, 3)
    assert _detections(run, "points") == []


def _greedy_points(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """The straightforward greedy radius NMS: best first, drop what a kept point covers."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable").tolist():
        if not kept or (np.hypot(*(points[kept] - points[i]).T) > radius).all():
            kept.append(i)
    return np.sort(np.array(kept, np.int64))


@pytest.mark.parametrize("seed", range(4))
def test_radius_nms_equals_the_straightforward_loop(seed: int) -> None:
    from wsi_assist.models.submodel_decode import radius_nms

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 1500))
    points = rng.uniform(0, 400, (n, 2))
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if seed % 2:
        scores = np.round(scores * 4) / 4  # many ties: broken by index
    for radius in (3.0, 8.0, 20.0):
        assert radius_nms(points, scores, radius).tolist() == \
            _greedy_points(points, scores, radius).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_box_nms_equals_torchvision_over_all_boxes(seed: int) -> None:
    import torch
    from torchvision.ops import nms

    from wsi_assist.models.submodel_decode import box_nms

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    xy = rng.uniform(0, 1, (n, 2)) * [1e4, 500] + [4e4, 0]  # level-0 px, crowded
    wh = rng.uniform(2, 60, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if seed % 2:
        scores = np.round(scores * 4) / 4
    for iou in (0.1, 0.5, 0.8):
        want = nms(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(scores), iou)
        assert box_nms(boxes, scores, iou).tolist() == np.sort(want.numpy()).tolist()
        assert n < 100 or iou > 0.1 or len(want) < 0.9 * n  # crowded enough


@pytest.mark.parametrize("seed", range(3))
def test_box_pairs_are_every_pair_over_the_iou_across_sizes_and_shapes(seed: int) -> None:
    """Widths and heights drawn apart over three decades (tiny, huge, elongated boxes, as
    an untrained YOLO head gives) and specks down to 1e-4 px, in groups: exactly the
    pairs the brute-force float32 IoU puts over the threshold, at thresholds down to 0."""
    from wsi_assist.models.submodel_nms import box_iou_pairs, box_pairs

    rng = np.random.default_rng(seed)
    n = 1500
    xy = rng.uniform(0, 640, (n, 2))
    wh = np.exp(rng.uniform(0, np.log(1000), (n, 2)))
    wh[:40] = np.exp(rng.uniform(np.log(1e-4), 0, (40, 2)))  # specks, some coinciding
    xy[:20], wh[:20] = xy[20:40], wh[20:40] * rng.uniform(0.9, 1.0, (20, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1).astype(np.float32)
    group = rng.integers(0, 3, n) if seed else None
    a, b = np.triu_indices(n, 1)
    iou_all = box_iou_pairs(boxes, a, b).astype(np.float64)
    same = np.ones(len(a), bool) if group is None else group[a] == group[b]
    for t in (0.0, 0.05, 0.45, 0.8):
        want = {(int(i), int(j)) for i, j in zip(a[same & (iou_all > t)],
                                                 b[same & (iou_all > t)], strict=True)}
        pa, pb = box_pairs(boxes, t, group)
        got = {(min(i, j), max(i, j)) for i, j in zip(pa.tolist(), pb.tolist(), strict=True)}
        assert got == want and len(pa) == len(want)  # each pair once
        assert t > 0.5 or len(want) > 30


def test_greedy_keep_resolves_long_chains() -> None:
    """A chain of points each within the radius of the next, scores falling along it,
    longer than the vectorised rounds: every other point is kept, as by the loop."""
    from wsi_assist.models.submodel_decode import radius_nms
    from wsi_assist.models.submodel_nms import MAX_ROUNDS

    n = 4 * MAX_ROUNDS + 3
    points = np.stack([np.arange(n) * 1.0, np.zeros(n)], axis=1)
    scores = np.linspace(1, 0, n).astype(np.float32)
    assert radius_nms(points, scores, 1.5).tolist() == list(range(0, n, 2))
    assert radius_nms(points, scores, 1.5).tolist() == \
        _greedy_points(points, scores, 1.5).tolist()
