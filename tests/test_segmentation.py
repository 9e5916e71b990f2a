"""Segmentation masks to QuPath annotations (holes, simplification, merging across tile
borders) and promptable SAM-style segmenters prompted by the built-in nuclei, end to end
to annotations.geojson and the report. The SAM stand-in is a tiny random-weight encoder
and decoder with SAM's ONNX export signature, exported in the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
import yaml
from findings_helper import report_config
from scipy.spatial import cKDTree
from shapely.geometry import shape
from stage_helper import run_slide
from torch import nn

from wsi_assist import config
from wsi_assist.errors import ModelError
from wsi_assist.models.mask_polygons import merge_polygons, outline_at, tile_polygons
from wsi_assist.models.promptable import PromptableSubmodel, get_promptable
from wsi_assist.models.submodel_spec import load_spec
from wsi_assist.stages import rebuild_report
from wsi_assist.synthetic import default_slide, write_slide

os.environ["HF_HUB_OFFLINE"] = "1"
TILE = 64
RADII = (3.0, 6.0, 9.0)  # the decoder's three masks; its IoU head prefers the second
HALO_UM = 4.0  # 8 px at 0.5 um/px: tiles of 64 + 2 x 8 px go to the 64 px encoder


def test_ring_across_tile_border_is_one_polygon_with_a_hole() -> None:
    yy, xx = np.mgrid[0:64, 0:128] + 0.5
    r = np.hypot(xx - 64, yy - 32)
    ring = (r >= 10) & (r <= 20)
    parts = [tile_polygons(ring[:, :64], 2.0, (1000.0, 500.0)),
             tile_polygons(ring[:, 64:], 2.0, (1128.0, 500.0))]  # 64 px x 2 = 128 level-0
    assert len(parts[0].geoms) == 1 and not parts[0].geoms[0].interiors
    merged = merge_polygons(parts, simplify_px=2.5)  # tolerance, level-0 px
    assert len(merged.geoms) == 1
    poly = merged.geoms[0]
    assert len(poly.interiors) == 1 and poly.is_valid
    assert shapely.Polygon(poly.interiors[0]).contains(shapely.Point(1128, 564))
    exact = merge_polygons(parts)
    assert len(poly.exterior.coords) < 0.5 * len(exact.geoms[0].exterior.coords)
    assert abs(poly.area - exact.area) < 0.02 * exact.area
    assert poly.hausdorff_distance(exact.geoms[0]) <= 2.5 + 1e-9
    assert merge_polygons(parts, min_area_px2=exact.area * 1.01).is_empty


class Stroma(nn.Module):
    """Two-class logits (background, stroma): stroma where the mean intensity is between
    nuclei (dark) and glass (bright), so each tissue piece is one region with a hole per
    nucleus. Hand-set; input (B,3,H,W) float in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        stroma = torch.minimum(m - 0.55, 0.9 - m) * 40.0
        return torch.cat([torch.zeros_like(stroma), stroma], dim=1)


def test_segmentation_regions_with_holes_end_to_end(tmp_path: Path) -> None:
    from exporters.submodels import export_model, spec_dict

    models = tmp_path / "models"
    models.mkdir()
    export_model(Stroma().eval(), models, spec_dict(
        "stroma", "segmentation", ["background", "stroma"], TILE, 0.5, mean=(0, 0, 0),
        std=(1, 1, 1), output={"simplify_um": 0.5, "min_area_um2": 50.0}), atol=1e-4)
    spec = default_slide(1024, 768, seed=3)
    slide = write_slide(tmp_path / "s.svs", spec, mpp=0.5, quality=95)
    out = tmp_path / "run"
    cfg = config.override(config.load(), tiling={"tile_px": TILE},
                          parallelism={"device": "cpu"},
                          submodels={"specs": [str(models / "stroma.yaml")]})
    run_slide(slide, out, cfg, ("tissue", "tiles", "submodels"))
    rebuild_report(out, report_config())
    feats = json.loads((out / "annotations.geojson").read_text())["features"]
    regions = [f for f in feats if f["properties"].get("metadata", {}).get("sub-model")
               == "stroma"]
    polys = [shape(f["geometry"]) for f in regions]
    assert all(f["properties"]["objectType"] == "annotation"
               and f["properties"]["classification"]["name"] == "stroma" for f in regions)
    assert all(p.is_valid for p in polys)
    # the tiles of each tissue piece dissolve into one region: no seams at tile borders
    big = [p for p in polys if p.area * 0.25 > 5000]
    assert 1 <= len(big) <= len(spec.ellipses) and len(polys) <= 3 * len(spec.ellipses)
    holes = [shapely.Polygon(r) for p in big for r in p.interiors]
    assert len(holes) > 50
    nuc = spec.nuclei()
    inside_hole = shapely.contains_xy(shapely.MultiPolygon(holes), nuc[:, 0], nuc[:, 1])
    d = cKDTree(nuc).query([h.centroid.coords[0] for h in holes])[0]
    assert np.mean(d < spec.nucleus_radius) > 0.9 and inside_hole.sum() > 50
    report = json.loads((out / "report.json").read_text())
    m = next(x for x in report["submodels"] if x["name"] == "stroma")
    assert m["counts"]["stroma"] == len(polys)
    assert "simplified to 0.5 µm" in m["method"]
    assert "merged across tile borders" in (out / "report.html").read_text()


def test_outline_at_takes_the_part_under_the_prompt() -> None:
    m = np.zeros((32, 32), bool)
    m[2:8, 2:8] = True
    m[20:30, 20:30] = True
    a = outline_at(m, (25.0, 25.0), 1.0, (100.0, 0.0))
    assert a is not None and a.area == 100 and a.bounds == (120, 20, 130, 30)
    b = outline_at(m, (9.0, 9.0), 1.0, (0.0, 0.0))  # off the mask: the nearest part
    assert b is not None and b.area == 36
    assert outline_at(np.zeros((8, 8), bool), (1.0, 1.0), 1.0, (0.0, 0.0)) is None


class TinyEncoder(nn.Module):
    """(1,3,64,64) float -> image_embeddings (1,8,16,16): random weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TinyDecoder(nn.Module):
    """SAM's ONNX decoder signature. Masks: discs of radii RADII around the positive
    point (label 1; padding points, label -1, ignored) plus a small random-weight term
    of the embedding; IoU predictions favour the second disc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.mix = nn.Conv2d(8, 3, 1)
        self.iou = nn.Linear(8, 3)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input,
                has_mask_input, orig_im_size):  # type: ignore[no-untyped-def]
        pos = (point_labels == 1).to(torch.float32).unsqueeze(-1)  # (B, N, 1)
        pt = (point_coords * pos).sum(1) / pos.sum(1).clamp(min=1)  # (B, 2)
        h = orig_im_size[0].to(torch.int64)
        w = orig_im_size[1].to(torch.int64)
        ys = torch.arange(h).to(torch.float32) + 0.5
        xs = torch.arange(w).to(torch.float32) + 0.5
        d = torch.sqrt((xs.view(1, 1, -1) - pt[:, 0].view(-1, 1, 1)) ** 2
                       + (ys.view(1, -1, 1) - pt[:, 1].view(-1, 1, 1)) ** 2)  # (B, H, W)
        radii = torch.tensor(RADII).view(1, 3, 1, 1)
        noise = torch.nn.functional.interpolate(self.mix(image_embeddings), scale_factor=4.0)
        masks = radii - d.unsqueeze(1) + 0.05 * torch.tanh(noise) + 0.0 * mask_input.mean() \
            + 0.0 * has_mask_input.sum()
        pooled = image_embeddings.mean(dim=(2, 3))
        iou = torch.tensor([[0.2, 0.9, 0.5]]) + 0.01 * torch.tanh(self.iou(pooled))
        return masks, iou, torch.nn.functional.avg_pool2d(masks, 4)


def export_sam(out: Path, name: str = "sam", prompts: dict | None = None,
               batched: bool = False) -> Path:
    """The tiny encoder and decoder as SAM's export makes them (one image, one prompt per
    call) or, ``batched``, with dynamic batch axes; and their spec."""
    enc, dec = out / f"{name}_encoder.onnx", out / f"{name}_decoder.onnx"
    torch.onnx.export(TinyEncoder().eval(), (torch.rand(1, 3, TILE, TILE),), str(enc),
                      input_names=["image"], output_names=["image_embeddings"], opset_version=17,
                      dynamic_axes={"image": {0: "b"}} if batched else None, dynamo=False)
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    if batched:
        axes = {"image_embeddings": {0: "b"}, "point_coords": {0: "b", 1: "num_points"},
                "point_labels": {0: "b", 1: "num_points"}, "mask_input": {0: "b"}}
    feeds = (torch.rand(1, 8, 16, 16), torch.tensor([[[20.0, 30.0], [0.0, 0.0]]]),
             torch.tensor([[1.0, -1.0]]), torch.zeros(1, 1, 64, 64), torch.zeros(1),
             torch.tensor([64.0, 64.0]))
    torch.onnx.export(TinyDecoder().eval(), feeds, str(dec),
                      input_names=["image_embeddings", "point_coords", "point_labels",
                                   "mask_input", "has_mask_input", "orig_im_size"],
                      output_names=["masks", "iou_predictions", "low_res_masks"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    spec = {"name": name, "task": "promptable-segmentation", "model": dec.name,
            "encoder": enc.name,
            "input": {"tile_px": TILE, "mpp": 0.5, "mean": [0.5] * 3, "std": [0.25] * 3},
            "prompts": prompts or {"source": "nuclei", "halo_um": HALO_UM},
            "output": {"classes": ["Cell"], "colors": [[230, 120, 0]], "activation": "none",
                       "score_threshold": 0.0, "simplify_um": 0.25},
            "scores": {"cells_per_mm2": {"kind": "density", "numerator": ["Cell"],
                                         "definition": "prompted cell outlines per mm^2"}}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def sam_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_sam(tmp_path_factory.mktemp("sam"))


def test_decoder_signature_checked(sam_spec: Path, tmp_path: Path) -> None:
    m = get_promptable(sam_spec, ["CPUExecutionProvider"])
    assert not m.batched and m.enc_batch1  # SAM's export: one prompt, one image per call
    masks, iou = m.decode(np.zeros((1, 8, 16, 16), np.float32),
                          np.array([[10.0, 12.0], [40.0, 50.0]], np.float32), TILE)
    assert masks.shape == (2, TILE, TILE) and np.allclose(iou, 0.9, atol=0.02)
    assert abs(masks[0].sum() - np.pi * 36) < 12 and masks[1][50, 40]
    spec = yaml.safe_load(sam_spec.read_text())
    spec["model"] = spec["encoder"]  # an image model where the decoder belongs
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    for f in sam_spec.parent.glob("*.onnx"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelError, match=r"takes inputs \['image_embeddings', .*model "
                                         r"takes \['image'\]"):
        PromptableSubmodel.load(load_spec(bad), ["CPUExecutionProvider"])
    spec.pop("encoder")
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelError, match="promptable-segmentation, which needs both"):
        load_spec(bad)


def test_batched_decoder_gives_the_same_masks(sam_spec: Path, tmp_path: Path) -> None:
    one = get_promptable(sam_spec, ["CPUExecutionProvider"])
    many = get_promptable(export_sam(tmp_path, "samb", batched=True), ["CPUExecutionProvider"])
    assert many.batched and not many.enc_batch1
    tiles = np.random.default_rng(0).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    emb = many.encode(many.encoder.prepare(tiles, TILE))
    assert emb.shape == (3, 8, 16, 16)
    assert np.allclose(emb, one.encode(one.encoder.prepare(tiles, TILE)), atol=1e-4)
    pts = np.array([[5.0, 6.0], [30.0, 31.0], [60.0, 2.0]], np.float32)
    m1, i1 = one.decode(emb[1:2], pts, TILE)
    m2, i2 = many.decode(emb[1:2], pts, TILE)
    assert (m1 == m2).all() and np.allclose(i1, i2, atol=1e-6) and m1.any(axis=(1, 2)).all()


@pytest.fixture(scope="module")
def sam_run(sam_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    slide = write_slide(tmp_path_factory.mktemp("sl") / "s.svs", default_slide(1024, 768,
                                                                               seed=3),
                        mpp=0.5, quality=95)
    out = tmp_path_factory.mktemp("run")
    cfg = config.override(config.load(), tiling={"tile_px": TILE},
                          parallelism={"device": "cpu"},
                          submodels={"specs": [str(sam_spec), "nuclei"]})
    run_slide(slide, out, cfg, ("tissue", "tiles", "submodels"))
    rebuild_report(out, report_config())
    return out


def test_sam_outlines_from_nucleus_prompts_end_to_end(sam_run: Path) -> None:
    from wsi_assist.store import SlideStore

    store = SlideStore(sam_run)
    nuc = store.read_submodel("nuclei")
    cents = np.asarray(nuc.arrays["points"][...])
    sam = store.read_submodel("sam")
    assert sam.attrs["n_prompts"] > 20 and sam.attrs["prompt_source"] == "nuclei"
    feats = json.loads((sam_run / "annotations.geojson").read_text())["features"]
    cells = [f for f in feats if f["properties"].get("metadata", {}).get("sub-model") == "sam"]
    assert len(cells) == sam.attrs["counts"]["Cell"] == sam.attrs["n_prompts"]
    assert all(f["properties"]["objectType"] == "detection"
               and f["properties"]["classification"]["name"] == "Cell" for f in cells)
    polys = [shape(f["geometry"]) for f in cells]
    assert all(p.is_valid for p in polys)
    # each outline is the chosen (r = 6 encoder px) disc around a nucleus centroid; tiles
    # are read with a halo, so cells on tile borders are outlined whole
    scale = (TILE + 2 * HALO_UM / 0.5) / TILE  # level-0 px per encoder px
    disc = np.pi * (RADII[1] * scale) ** 2
    near = cents[cKDTree(cents).query([p.centroid.coords[0] for p in polys])[1]]
    assert np.mean([p.buffer(1e-6).contains(shapely.Point(*c))
                    for p, c in zip(polys, near, strict=True)]) > 0.97
    areas = np.array([f["properties"]["measurements"]["Area µm^2"] for f in cells]) / 0.25
    assert abs(np.median(areas) - disc) < 0.1 * disc
    assert np.mean(areas > 0.85 * disc) > 0.95  # not cut at tile borders
    report = json.loads((sam_run / "report.json").read_text())
    m = next(x for x in report["submodels"] if x["name"] == "sam")
    assert m["counts"]["Cell"] == len(cells)
    assert m["scores"]["cells_per_mm2"]["value"] > 0
    assert "prompted cell outlines per mm^2" in (sam_run / "report.html").read_text()


def test_prompt_classes_must_exist(sam_spec: Path, tmp_path_factory, tmp_path) -> None:
    from wsi_assist.errors import WsiAssistError
    from wsi_assist.stages import promptable as stage
    from wsi_assist.store import SubmodelRecord

    path = export_sam(tmp_path, "sam2", {"source": "nuclei", "classes": ["Tumour"]})
    m = get_promptable(path, ["CPUExecutionProvider"])
    rec = SubmodelRecord(name="nuclei", attrs={"classes": ["Negative", "Positive"]},
                         arrays={"points": np.zeros((0, 2))})
    with pytest.raises(WsiAssistError, match=r"'Tumour', not a class of 'nuclei'; valid: "
                                             r"\['Negative', 'Positive'\]"):
        stage.read_prompts(rec, m, None)  # type: ignore[arg-type]
