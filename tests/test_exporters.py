"""Exporters: timm classifiers (PathAsst layout), factories, parity enforcement, built-in."""

from __future__ import annotations

import os
from pathlib import Path

import _subnets
import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters import submodels as ex
from wsi_assist.errors import ModelError
from wsi_assist.models import submodels as sm
from wsi_assist.synthetic import default_slide

os.environ["HF_HUB_OFFLINE"] = "1"


def _tiles() -> np.ndarray:
    spec = default_slide(1024, 768)
    return np.stack([spec.render(150, 200, 96, 96), spec.render(600, 150, 96, 96)])


def test_point_detector_exports_with_any_tile_size(tmp_path: Path) -> None:
    diff = ex.export_model(_subnets.stain_points(), tmp_path, _subnets.stain_points_spec(),
                           atol=1e-4)
    assert diff <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "points.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["points", "scores", "labels",
                                                   "measurements"]
    x = _tiles()  # 96 px tiles, not the 224 px of the export example
    out = sess.run(None, {"tiles": x})
    with torch.no_grad():
        want = _subnets.stain_points()(torch.from_numpy(x))
    for u, v in zip(out, want, strict=True):
        np.testing.assert_allclose(u, v.numpy(), atol=1e-4)
    assert (out[1] > 0.15).sum() > 20  # it finds the nuclei
    assert sm.Submodel.load(tmp_path / "points.yaml", ["CPUExecutionProvider"]).spec.task \
        == "point-detection"


def test_factory_cli_exports_with_dynamic_batch(tmp_path: Path, capsys) -> None:
    rc = ex.main(["factory", "--factory", "_subnets:classifier", "--task",
                  "tile-classification", "--classes", "a,b,c", "--name", "fac", "-o",
                  str(tmp_path), "--tile-px", "32"])
    assert rc == 0
    assert "max |torch - onnx| = " in capsys.readouterr().out
    sess = ort.InferenceSession(str(tmp_path / "fac.onnx"))
    assert isinstance(sess.get_inputs()[0].shape[0], str)
    tiles = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    out = sess.run(None, {"tiles": tiles})[0]
    # ImageNet normalisation is baked into the graph: same as the float model on it
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((tiles / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        want = _subnets.classifier(3)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, want, atol=1e-4)
    sub = sm.Submodel.load(tmp_path / "fac.yaml", ["CPUExecutionProvider"])
    assert (sub.spec.input.dtype, sub.spec.input.layout) == ("uint8", "NHWC")


def test_cli_reports_bad_factory(tmp_path: Path, capsys) -> None:
    rc = ex.main(["factory", "--factory", "_subnets", "--task", "segmentation", "--classes",
                  "a", "--name", "x", "-o", str(tmp_path)])
    assert rc == 2 and "module:function" in capsys.readouterr().err


def test_parity_beyond_tolerance_is_refused(tmp_path: Path) -> None:
    spec = ex.spec_dict("drift", "tile-classification", ["a", "b"], 16, 0.5, (0, 0, 0),
                        (1, 1, 1))
    with pytest.raises(ValueError, match="differs from PyTorch by up to 1"):
        ex.export_model(_subnets.Drifting(), tmp_path, spec, atol=1e-3)
    assert not (tmp_path / "drift.yaml").exists()


def test_pathasst_layout_checkpoint_loads_and_exports(tmp_path: Path, capsys) -> None:
    assert ex.TimmClassifier("convnext_tiny", 5).head.in_features == 768
    ref = ex.TimmClassifier("test_convnext", 4).eval()
    sd = {f"module.backbone.{k}": v for k, v in ref.backbone.state_dict().items()}
    sd.update({"module.fc.weight": ref.head.weight, "module.fc.bias": ref.head.bias})
    ckpt = tmp_path / "cls.pt"
    torch.save({"state_dict": sd}, ckpt)
    model = ex.TimmClassifier("test_convnext", 4).eval()
    ex.load_timm_checkpoint(model, ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    rc = ex.main(["timm", "--arch", "test_convnext", "--classes", "a,b,c,d", "--checkpoint",
                  str(ckpt), "--name", "lbc", "-o", str(tmp_path), "--tile-px", "64"])
    assert rc == 0, capsys.readouterr().err
    rc = ex.main(["timm", "--arch", "test_convnext", "--classes", "a,b,c,d", "--checkpoint",
                  str(ckpt), "--name", "lbc", "-o", str(tmp_path), "--tile-px", "64",
                  "--float-input"])
    assert rc == 0, capsys.readouterr().err
    sess = ort.InferenceSession(str(tmp_path / "lbc.onnx"))
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"tiles": x})[0], want, atol=1e-4)


def test_wrong_head_is_refused(tmp_path: Path) -> None:
    ref = ex.TimmClassifier("test_convnext", 3)
    sd = dict(ref.state_dict())
    ckpt = tmp_path / "c.pt"
    torch.save(sd, ckpt)
    with pytest.raises(ModelError, match=r"expected \(5, "):
        ex.load_timm_checkpoint(ex.TimmClassifier("test_convnext", 5), ckpt)
    torch.save({k: v for k, v in sd.items() if not k.startswith("backbone.stem")}, ckpt)
    with pytest.raises(ModelError, match="backbone weights missing"):
        ex.load_timm_checkpoint(ex.TimmClassifier("test_convnext", 3), ckpt)


def test_random_point_model_through_cli_and_stage(tmp_path: Path, svs_slide: Path) -> None:
    from test_submodels import _run

    rc = ex.main(["factory", "--factory", "_subnets:random_points", "--task", "point-detection",
                  "--classes", "p,q,r", "--measurements", "m1,m2", "--name", "pts", "-o",
                  str(tmp_path), "--tile-px", "64"])
    assert rc == 0
    run = _run(svs_slide, tmp_path / "run", [str(tmp_path / "pts.yaml")])
    sg = run.sub("pts")
    grid = run.store.read_grid()
    pts = np.asarray(sg.arrays["points"][...])
    assert len(pts) > 0 and sg.arrays["measurements"].attrs["measurement_names"] == ["m1", "m2"]
    assert (np.asarray(sg.arrays["scores"][...]) >= 0.5).all()  # the spec's default threshold
    # every point lies in a tile it came from, on the 4-px cell-centre lattice
    rel = pts[:, None, :] - grid.coords[None, :, :]
    hit = ((rel >= 0) & (rel < grid.size_l0)).all(axis=2)
    assert hit.any(axis=1).all() and grid.size_l0 == 64  # model px == level-0 px here
    off = rel[np.arange(len(pts)), hit.argmax(axis=1)]
    np.testing.assert_allclose(off % 4, 2.0)
    assert sum(sg.attrs["counts"].values()) == len(pts)
