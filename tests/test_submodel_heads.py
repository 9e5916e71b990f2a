"""Raw detection heads and PathAsst's tools: YOLOv5/v7 and v8 decoding with class-aware
NMS, P2PNet points, the exporter finding (or being told) the head layout and refusing
outputs that fit nothing, PathAsst's classifier checkpoint as released, and every
example spec in configs/submodels/ run end to end with a tiny random model in its
real layout."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import _pathasst
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from findings_helper import report_config
from torchvision.ops import box_iou

from exporters import submodels as ex
from wsi_assist.errors import ModelError
from wsi_assist.models import submodels as sm
from wsi_assist.models.submodel_heads import decode_outputs, decode_p2pnet, decode_yolo
from wsi_assist.models.submodel_spec import DecodeSpec, ScoreSpec, load_spec
from wsi_assist.report.labels import score_label
from wsi_assist.stages import rebuild_report

os.environ["HF_HUB_OFFLINE"] = "1"
SPECS = Path(__file__).resolve().parents[1] / "configs" / "submodels"
CPU = ["CPUExecutionProvider"]


def _yolo_row(box: tuple[float, float, float, float], obj: float, cls: list[float]
              ) -> list[float]:
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, obj, *cls]


def test_yolov5_decoding_is_class_aware_and_capped() -> None:
    rows = [
        _yolo_row((10, 10, 50, 50), 0.9, [0.9, 0.1]),    # kept: best of class 0
        _yolo_row((12, 12, 52, 52), 0.9, [0.8, 0.1]),    # same class, IoU ~0.9: suppressed
        _yolo_row((11, 11, 51, 51), 0.9, [0.1, 0.7]),    # class 1 over it: kept
        _yolo_row((100, 100, 120, 130), 0.5, [0.3, 0.2]),  # 0.15 < 0.25: dropped
        _yolo_row((200, 10, 230, 40), 0.6, [0.1, 0.9]),   # kept
    ]
    raw = np.zeros((2, 6, 7), np.float32)
    raw[0, :5] = rows
    raw[1, 0] = _yolo_row((5, 5, 25, 25), 0.8, [0.5, 0.4])  # 0.4: kept, tile 1
    out = decode_yolo(raw, DecodeSpec(head="yolov5"), 2, 0.25, 0.5)
    keep = out["scores"] >= 0.25
    assert keep.sum(axis=1).tolist() == [3, 1]
    got = {(tuple(np.round(b).astype(int)), int(lab)) for b, lab in
           zip(out["boxes"][0][keep[0]], out["labels"][0][keep[0]], strict=True)}
    assert got == {((10, 10, 50, 50), 0), ((11, 11, 51, 51), 1), ((200, 10, 230, 40), 1)}
    np.testing.assert_allclose(sorted(out["scores"][0][keep[0]]), [0.54, 0.63, 0.81],
                               atol=1e-6)
    assert (out["scores"][~keep] == -1).all()
    capped = decode_yolo(raw, DecodeSpec(head="yolov5", max_detections=2), 2, 0.25, 0.5)
    assert (capped["scores"] >= 0.25).sum(axis=1).tolist() == [2, 1]
    assert capped["scores"][0].max() == pytest.approx(0.81)  # the best ones stay


def test_one_class_yolov7_is_scored_by_objectness() -> None:
    raw = np.array([[_yolo_row((10, 10, 50, 50), 0.6, [0.3]),
                     _yolo_row((100, 10, 150, 50), 0.2, [0.9])]], np.float32)
    v5 = decode_yolo(raw, DecodeSpec(head="yolov5"), 1, 0.25, 0.5)
    assert (v5["scores"] < 0.25).all()  # 0.18 and 0.18: objectness x class score
    v7 = decode_yolo(raw, DecodeSpec(head="yolov7"), 1, 0.25, 0.5)
    keep = v7["scores"][0] >= 0.25
    assert v7["scores"][0][keep].tolist() == [pytest.approx(0.6)]
    np.testing.assert_allclose(v7["boxes"][0][keep][0], [10, 10, 50, 50])
    many = np.array([[_yolo_row((10, 10, 50, 50), 0.6, [0.3, 0.9])]], np.float32)
    for head in ("yolov5", "yolov7"):  # more classes: the two score alike
        got = decode_yolo(many, DecodeSpec(head=head), 2, 0.25, 0.5)
        assert got["scores"][0, 0] == pytest.approx(0.54) and got["labels"][0, 0] == 1


def test_one_class_yolo_head_needs_to_be_named(tmp_path: Path, capsys) -> None:
    args = ["factory", "--factory", "_pathasst:yolov7_one", "--task", "box-detection",
            "--classes", "cell", "--name", "one", "-o", str(tmp_path), "--tile-px", "96"]
    assert ex.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fit both yolov5 and yolov7 heads" in err
    assert "say which with --head" in err and not list(tmp_path.glob("*.yaml"))
    assert ex.main([*args, "--head", "yolov7"]) == 0, capsys.readouterr().err
    sess = ort.InferenceSession(str(tmp_path / "one.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["output"]  # YOLOv7 export.py's name
    sub = sm.Submodel.load(tmp_path / "one.yaml", CPU)
    assert sub.spec.decode is not None and sub.spec.decode.head == "yolov7"
    tiles = np.random.default_rng(2).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    raw = sub.run(sub.prepare(tiles, 96))
    dec = decode_outputs(sub.spec, sub.spec.decode, raw)
    ok = dec["scores"] >= sub.spec.output.score_threshold
    assert ok.any()
    objectness = raw["output"][..., 4]  # every kept score is some anchor's objectness
    for t in range(len(tiles)):
        assert np.isin(dec["scores"][t][ok[t]], objectness[t]).all()


def test_yolov8_layout_and_sigmoid() -> None:
    rows = np.array([_yolo_row((0, 0, 20, 20), 0, [2.0, -3.0])[:4] + [2.0, -3.0],
                     _yolo_row((40, 40, 60, 60), 0, [0, 0])[:4] + [-3.0, -2.0]], np.float32)
    raw = rows.T[None]  # (1, 4+nc, N)
    out = decode_yolo(raw, DecodeSpec(head="yolov8", activation="sigmoid"), 2, 0.25, 0.5)
    keep = out["scores"][0] >= 0.25
    assert keep.sum() == 1 and out["labels"][0][keep][0] == 0
    np.testing.assert_allclose(out["boxes"][0][keep][0], [0, 0, 20, 20])
    assert out["scores"][0][keep][0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_p2pnet_softmax_drops_background() -> None:
    logits = np.array([[[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]], np.float32)
    pts = np.array([[[5.0, 6.0], [7.0, 8.0]]], np.float32)
    last = decode_p2pnet(logits, pts, "last")
    e = np.exp([3.0, 0, 0]) / np.exp([3.0, 0, 0]).sum()
    assert last["labels"][0].tolist() == [0, 0]
    np.testing.assert_allclose(last["scores"][0], [e[0], e[1]], rtol=1e-6)
    first = decode_p2pnet(logits, pts, "first")  # original P2PNet: background at 0
    assert first["labels"][0].tolist() == [0, 1]
    np.testing.assert_allclose(first["scores"][0], [e[1], e[0]], rtol=1e-6)
    np.testing.assert_array_equal(first["points"], pts)


@pytest.mark.parametrize(("factory", "head", "classes"), [
    ("_pathasst:yolov7_lbc", "yolov5", "a,b,c,d,e"),
    ("_pathasst:yolov8", "yolov8", "a,b,c"),
])
def test_yolo_heads_export_and_decode_to_boxes(tmp_path: Path, capsys, factory: str,
                                               head: str, classes: str) -> None:
    rc = ex.main(["factory", "--factory", factory, "--task", "box-detection", "--classes",
                  classes, "--name", "det", "-o", str(tmp_path), "--tile-px", "96"])
    assert rc == 0, capsys.readouterr().err
    assert f"decode step: {head}" in capsys.readouterr().out
    data = yaml.safe_load((tmp_path / "det.yaml").read_text())
    data["output"]["score_threshold"] = 0.25  # YOLO's usual confidence threshold
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "det.yaml")
    assert spec.decode is not None and spec.decode.head == head
    sess = ort.InferenceSession(str(tmp_path / "det.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["output0"]
    tiles = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    raw = sess.run(None, {"tiles": tiles})[0]
    net = ex.Uint8Input(_pathasst.__dict__[factory.split(":")[1]](), ex.IMAGENET_MEAN,
                        ex.IMAGENET_STD).eval()
    with torch.no_grad():
        want = net(torch.from_numpy(tiles))
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    np.testing.assert_allclose(raw, want, atol=1e-4)
    sub = sm.Submodel.load(tmp_path / "det.yaml", CPU)
    dec = decode_outputs(sub.spec, spec.decode, sub.run(sub.prepare(tiles, 96)))
    boxes, scores = dec["boxes"], dec["scores"]
    ok = scores >= spec.output.score_threshold
    assert ok.any()
    b = boxes[ok]
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    # no two kept boxes of one tile and class overlap beyond the IoU threshold
    for t in range(len(tiles)):
        for c in np.unique(dec["labels"][t][ok[t]]):
            sel = boxes[t][ok[t] & (dec["labels"][t] == c)]
            iou = box_iou(torch.from_numpy(sel), torch.from_numpy(sel)).numpy()
            assert (iou[~np.eye(len(sel), dtype=bool)] <= spec.output.iou_threshold).all()


def test_p2pnet_dict_outputs_export_through_adapter(tmp_path: Path, capsys) -> None:
    rc = ex.main(["factory", "--factory", "_pathasst:p2pnet", "--task", "point-detection",
                  "--classes", "pos,neg", "--name", "p2p", "-o", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    sess = ort.InferenceSession(str(tmp_path / "p2p.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["pred_logits", "pred_points"]
    assert load_spec(tmp_path / "p2p.yaml").decode.head == "p2pnet"  # type: ignore[union-attr]


def test_outputs_that_fit_nothing_get_one_line(tmp_path: Path, capsys) -> None:
    rc = ex.main(["factory", "--factory", "_pathasst:Mismatched", "--task", "box-detection",
                  "--classes", "a,b", "--name", "bad", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "model outputs tensor (2, 7) do not fit box-detection" in err
    assert "YOLOv5/v7 head (B, N, 7)" in err and "YOLOv8 head (B, 6, N)" in err
    rc = ex.main(["factory", "--factory", "_pathasst:yolov7_lbc", "--head", "yolov8",
                  "--classes", "a,b,c,d,e", "--name", "bad", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "tuple (tensor (2, 588, 10), list (tensor (2, 30, 14, 14)))" in err
    assert "do not fit --head yolov8" in err
    rc = ex.main(["factory", "--factory", "_pathasst:p2pnet", "--task", "point-detection",
                  "--classes", "a,b,c", "--name", "bad", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "'pred_logits': tensor (2, 3136, 3)" in err
    assert "'pred_logits': (B, N, 4)" in err
    assert not list(tmp_path.glob("*.yaml"))


def test_runtime_refuses_a_spec_its_head_does_not_fit(tmp_path: Path) -> None:
    assert ex.main(["factory", "--factory", "_pathasst:yolov8", "--task", "box-detection",
                    "--classes", "a,b,c", "--name", "det", "-o", str(tmp_path),
                    "--tile-px", "64"]) == 0
    data = yaml.safe_load((tmp_path / "det.yaml").read_text())
    data["decode"] = {"head": "yolov5"}
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(data))
    sub = sm.Submodel.load(tmp_path / "det.yaml", CPU)  # its anchors axis is symbolic
    tiles = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ModelError, match=r"decode head yolov5 with 3 classes expects 8 on "
                                         r"axis 2 of 'output0', the model gave \[2, 7, 16\]"):
        decode_outputs(sub.spec, sub.spec.decode, sub.run(sub.prepare(tiles, 64)))
    assert ex.main(["factory", "--factory", "_pathasst:p2pnet", "--classes", "a,b",
                    "--head", "p2pnet", "--name", "p2p", "-o", str(tmp_path)]) == 0
    p2p = yaml.safe_load((tmp_path / "p2p.yaml").read_text())
    p2p["output"]["classes"], p2p["output"]["colors"] = ["a", "b", "c"], [[1, 2, 3]] * 3
    (tmp_path / "p2p.yaml").write_text(yaml.safe_dump(p2p))
    with pytest.raises(ModelError, match=r"decode head p2pnet with 3 classes expects 4 on "
                                         r"axis 2 of 'pred_logits', model's shape is"):
        sm.Submodel.load(tmp_path / "p2p.yaml", CPU)
    data["decode"] = {"head": "yolov8", "outputs": ["raw"]}
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match=r"needs outputs \['raw'\], model has \['output0'\]"):
        sm.Submodel.load(tmp_path / "det.yaml", CPU)
    data["task"] = "point-detection"
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match="decode head yolov8 gives box-detection"):
        load_spec(tmp_path / "det.yaml")


def _released_classifier_checkpoint(path: Path, n: int) -> _pathasst.CtSingle:
    """PathAsst's checkpoint as released: {'model': state_dict, 'args': Namespace, ...}."""
    torch.manual_seed(5)
    net = _pathasst.CtSingle("test_convnext", n).eval()
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(model="convnext_tiny",
                                                                      lr=1e-4),
                "epoch": 29}, path)
    return net


def test_pathasst_classifier_checkpoint_as_released(tmp_path: Path, capsys) -> None:
    net = _released_classifier_checkpoint(tmp_path / "ct.pth", 2)
    keys = set(torch.load(tmp_path / "ct.pth", weights_only=False)["model"])
    assert "fc.weight" in keys and "model_global.stem.0.weight" in keys
    rc = ex.main(["timm", "--arch", "test_convnext", "--classes", "pathology,other",
                  "--checkpoint", str(tmp_path / "ct.pth"), "--name", "ct", "-o",
                  str(tmp_path), "--tile-px", "64"])
    assert rc == 0, capsys.readouterr().err
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(tmp_path / "ct.onnx")).run(None, {"tiles": tiles})[0]
    x = (tiles / 255.0 - np.array(ex.IMAGENET_MEAN)) / np.array(ex.IMAGENET_STD)
    with torch.no_grad():
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    rc = ex.main(["timm", "--arch", "test_convnext", "--classes", "a,b,c", "--checkpoint",
                  str(tmp_path / "ct.pth"), "--name", "ct3", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "head 'fc.weight' has shape (2, " in err and err.count("\n") == 1


# --- every PathAsst example spec, end to end ---------------------------------------

def _factory_ckpt(net: torch.nn.Module, path: Path) -> None:
    torch.save({"model": net.state_dict(), "epoch": 1}, path)


TOOLS = {  # spec file: (exporter arguments, random network in the released layout)
    "pathasst-pathology-selector.yaml": (["timm", "--arch", "test_convnext"], None),
    "pathasst-lbc-cytology.yaml": (["timm", "--arch", "test_convnext"], None),
    "pathasst-lbc-yolov7.yaml": (["factory", "--factory", "_pathasst:yolov7_lbc6"],
                                 "yolov7_lbc6"),
    "pathasst-blood-yolov7.yaml": (["factory", "--factory", "_pathasst:yolov7_blood"],
                                   "yolov7_blood"),
    "pathasst-ki67-p2pnet.yaml": (["factory", "--factory", "_pathasst:p2pnet"], "p2pnet"),
    "pathasst-pdl1-p2pnet.yaml": (["factory", "--factory", "_pathasst:p2pnet3"], "p2pnet3"),
    "pathasst-her2-p2pnet.yaml": (["factory", "--factory", "_pathasst:p2pnet4"], "p2pnet4"),
}


#: needs the promptable-segmentation runtime (issue 16 part 3), tested with it
SAM = "pathasst-sam.yaml"


def test_every_pathasst_example_is_covered() -> None:
    assert sorted(p.name for p in SPECS.glob("pathasst-*.yaml")) == sorted([*TOOLS, SAM])


def test_sam_example_fits_the_promptable_runtime() -> None:
    from wsi_assist.models import submodel_spec

    if "promptable-segmentation" not in submodel_spec.TASKS:
        pytest.skip("the promptable-segmentation runtime (issue 16 part 3) is not here")
    spec = load_spec(SPECS / SAM)
    assert spec.task == "promptable-segmentation" and spec.output.classes == ("Cell",)


def _first_rule_met(s: ScoreSpec, counts: dict[str, int], den: int) -> str | None:
    if not den:
        return None
    ops = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    for r in s.rules:
        if all(ops[w.op](100.0 * sum(counts[c] for c in w.classes) / den, w.percent)
               for w in r.when):
            return r.category
    return None


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_pathasst_example_end_to_end(name: str, tmp_path: Path, svs_slide: Path,
                                     capsys) -> None:
    from test_submodels import _run

    args, fn = TOOLS[name]
    template = yaml.safe_load((SPECS / name).read_text())
    ckpt = tmp_path / "weights.pth"
    n = len(template["output"]["classes"])
    if fn is None:
        _released_classifier_checkpoint(ckpt, n)
    else:
        _factory_ckpt(getattr(_pathasst, fn)(), ckpt)
    models = tmp_path / "models"
    rc = ex.main([*args, "--spec", str(SPECS / name), "--checkpoint", str(ckpt), "-o",
                  str(models)])
    assert rc == 0, capsys.readouterr().err
    spec_path = models / name
    spec = load_spec(spec_path)
    assert spec.task == template["task"] and list(spec.output.classes) == \
        template["output"]["classes"] and set(spec.scores) == set(template["scores"])
    assert (spec.decode.head if spec.decode else None) == \
        (template.get("decode") or {}).get("head")
    out = tmp_path / "run"
    run = _run(svs_slide, out, [str(spec_path)], tile_px=256)
    rec = run.sub(spec.name)
    counts = rec.attrs["counts"]
    assert set(counts) == set(spec.output.classes) and sum(counts.values()) > 0
    for sname, s in spec.scores.items():  # each score from the counts, as defined
        got = rec.attrs["scores"][sname]["value"]
        num = sum(counts[c] for c in s.numerator)
        den = sum(counts[c] for c in s.denominator)
        if s.kind == "ratio":
            assert got == (pytest.approx(num / den * s.scale) if den else None)
        elif s.kind == "categorical":  # the first rule whose conditions all hold
            assert got == _first_rule_met(s, counts, den)
        else:
            assert got is not None and got > 0
    rebuild_report(out, report_config(include_tiles=True))
    feats = json.loads((out / "annotations.geojson").read_text())["features"]
    md = (out / "report.md").read_text()
    assert f"### {spec.name} ({spec.task})" in md
    for sname, s in spec.scores.items():
        assert f"**{score_label(sname)}**" in md and " ".join(s.definition.split()) in md
    if spec.task == "tile-classification":
        assert sum(counts.values()) == len(run.store.read_grid())
        return
    det = [f for f in feats if f["properties"].get("objectType") == "detection"
           and f["properties"]["classification"]["name"] in spec.output.classes]
    assert len(det) == sum(counts.values())
    kind = "Point" if spec.task == "point-detection" else "Polygon"
    assert {f["geometry"]["type"] for f in det} == {kind}


def _random_candidates(rng: np.random.Generator, n_tiles: int, n: int, n_classes: int,
                       tied: bool) -> tuple[np.ndarray, ...]:
    """Candidate boxes of a batch as the YOLO decoding hands them to NMS (sorted by tile),
    crowded so that many overlap; ``tied``: scores on a coarse grid, so ties are common."""
    tile = np.sort(rng.integers(0, n_tiles, n))
    xy = rng.uniform(0, 224, (n, 2))
    wh = rng.uniform(4, 40, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0.25, 1, n).astype(np.float32)
    if tied:
        scores = np.round(scores * 8) / 8
    return boxes, scores, rng.integers(0, n_classes, n), tile


@pytest.mark.parametrize("seed", range(6))
def test_batched_class_aware_nms_equals_tile_by_tile_torchvision(seed: int) -> None:
    """One pass over the whole batch keeps exactly what torchvision nms keeps tile by tile
    (classes shifted apart), in the same order, including score ties, the cut to each
    tile's best candidates and the per-tile cap."""
    from wsi_assist.models.submodel_heads import MAX_NMS, _class_aware_nms, reference_nms

    rng = np.random.default_rng(seed)
    n_tiles, limit = int(rng.integers(1, 9)), int(rng.integers(2, 40))
    max_nms = int(rng.integers(20, 400)) if seed < 4 else MAX_NMS
    boxes, scores, labels, tile = _random_candidates(
        rng, n_tiles, int(rng.integers(0, 3000)), int(rng.integers(1, 7)), seed % 2 == 1)
    for iou in (0.3, 0.5, 0.7):
        kept, kt = _class_aware_nms(boxes, scores, labels, tile, n_tiles, iou, limit,
                                    max_nms)
        want = reference_nms(boxes, scores, labels, tile, n_tiles, iou, limit, max_nms)
        for t in range(n_tiles):
            assert kept[kt == t].tolist() == want[t].tolist()
        assert (np.diff(kt) >= 0).all()


def test_decode_yolo_pads_tiles_without_detections() -> None:
    dec = DecodeSpec(head="yolov5", max_detections=5)
    raw = np.zeros((3, 4, 7), np.float32)
    raw[1, 0] = _yolo_row((0, 0, 10, 10), 0.9, [0.1, 0.8])
    raw[1, 1] = _yolo_row((1, 0, 11, 10), 0.9, [0.1, 0.7])  # same class: suppressed
    raw[1, 2] = _yolo_row((1, 0, 11, 10), 0.9, [0.6, 0.1])  # other class: kept
    out = decode_yolo(raw, dec, 2, 0.25, 0.5)
    assert out["scores"].shape == (3, 2)
    assert (out["scores"][[0, 2]] == -1).all()
    assert out["labels"][1].tolist() == [1, 0]
    assert np.allclose(out["scores"][1], [0.9 * 0.8, 0.9 * 0.6])


@pytest.mark.parametrize(("classes", "background"), [(1, "last"), (2, "last"), (4, "first")])
def test_p2pnet_decoding_equals_plain_softmax(classes: int, background: str) -> None:
    """Plane-by-plane decoding gives the straightforward softmax's labels and scores."""
    rng = np.random.default_rng(classes)
    logits = (rng.normal(size=(5, 300, classes + 1)) * 6).astype(np.float32)
    logits[0, :10] = 1.0  # ties between classes: the first one wins, as with argmax
    points = rng.uniform(0, 224, (5, 300, 2)).astype(np.float32)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    probs = probs[..., 1:] if background == "first" else probs[..., :-1]
    out = decode_p2pnet(logits, points, background)
    np.testing.assert_array_equal(out["labels"], probs.argmax(axis=-1))
    np.testing.assert_allclose(out["scores"], probs.max(axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(out["points"], points)


@pytest.mark.parametrize(("classes", "background", "threshold"),
                         [(1, "last", 0.5), (2, "first", 0.3), (4, "last", 0.9)])
def test_p2pnet_threshold_keeps_exactly_the_points_above_it(classes: int, background: str,
                                                            threshold: float) -> None:
    """With a threshold, decoding passes on exactly the points the full softmax scores at
    or above it, in anchor order, with the same labels, scores and points."""
    rng = np.random.default_rng(7 + classes)
    logits = (rng.normal(size=(6, 400, classes + 1)) * 3).astype(np.float32)
    points = rng.uniform(0, 224, (6, 400, 2)).astype(np.float32)
    full = decode_p2pnet(logits, points, background)
    cut = decode_p2pnet(logits, points, background, threshold)
    for t in range(len(logits)):
        want = full["scores"][t] >= threshold
        got = cut["scores"][t] >= 0
        assert got.sum() == want.sum() > 0
        assert (cut["scores"][t][~got] == -1).all()
        np.testing.assert_array_equal(cut["labels"][t][got], full["labels"][t][want])
        np.testing.assert_allclose(cut["scores"][t][got], full["scores"][t][want], rtol=1e-6)
        np.testing.assert_array_equal(cut["points"][t][got], full["points"][t][want])
