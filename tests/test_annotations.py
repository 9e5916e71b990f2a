"""annotations.geojson read back the way QuPath's importer reads it; class regions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from findings_helper import CLASSES, report_config, tiled_slide, write_findings
from shapely.geometry import shape

from wsi_assist.aggregate import class_regions
from wsi_assist.stages import rebuild_report
from wsi_assist.store import SlideStore
from wsi_assist.tiling import TileGrid

OBJECT_TYPES = {"annotation", "detection", "cell", "tile"}


def _no_constants(name: str) -> float:
    raise ValueError(f"non-finite number {name} in GeoJSON")


def qupath_read(path: Path) -> list[dict]:
    """What QuPath's GeoJSON importer needs, checked feature by feature."""
    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
    assert data["type"] == "FeatureCollection"
    out = []
    for f in data["features"]:
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        assert "objectType" not in f  # QuPath ignores it at the top level
        if "classification" in props:
            c = props["classification"]
            assert isinstance(c["name"], str) and c["name"]
            assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                for v in c["color"])
        for k, v in props.get("measurements", {}).items():
            assert isinstance(k, str) and isinstance(v, int | float) and math.isfinite(v)
        geom = shape(f["geometry"])
        assert geom.is_valid and not geom.is_empty, f"invalid geometry in {f['id']}"
        out.append({**props, "geometry": geom})
    return out


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory, svs_slide: Path, syn_spec) -> Path:
    d = tiled_slide(tmp_path_factory.mktemp("ann"), svs_slide)
    write_findings(d, syn_spec.nuclei(), syn_spec.width, captions=False)
    return d


def test_annotations_read_like_qupath(slide_dir: Path, syn_spec) -> None:
    rebuild_report(slide_dir, report_config(include_tiles=True))
    feats = qupath_read(slide_dir / "annotations.geojson")
    n_tiles = len(SlideStore(slide_dir, mode="r").read_grid())
    by_type: dict[str, list[dict]] = {}
    for f in feats:
        by_type.setdefault(f["objectType"], []).append(f)
    # tissue pieces and class regions, plus the passed-through segmentation
    names = [f["classification"]["name"] for f in by_type["annotation"]]
    assert names.count("Tissue") == 3 and "Tumor" in names and "Stroma" in names
    gland = next(f for f in by_type["annotation"] if f["classification"]["name"] == "Gland")
    assert len(gland["geometry"].interiors) == 1  # holes kept
    assert gland["metadata"]["sub-model"] == "sam"
    # detections: every nucleus as a point, with its class colour and measurements
    nuclei = syn_spec.nuclei()
    pts = [f for f in by_type["detection"] if f["geometry"].geom_type == "Point"]
    assert len(pts) == len(nuclei)
    got = np.array([[p["geometry"].x, p["geometry"].y] for p in pts])
    np.testing.assert_allclose(got, nuclei)
    assert {p["classification"]["name"] for p in pts} == {"Ki-67 positive", "Ki-67 negative"}
    assert set(pts[0]["measurements"]) == {"Score", "Area um^2", "Index"}
    boxes = [f for f in by_type["detection"] if f["geometry"].geom_type == "Polygon"]
    assert len(boxes) == 5 and boxes[0]["classification"]["color"] == [0, 150, 150]
    # tiles: one per grid row, probabilities as measurements summing to 1
    tiles = by_type["tile"]
    assert len(tiles) == n_tiles
    probs = [sum(t["measurements"][f"p({c})"] for c in CLASSES) for t in tiles]
    np.testing.assert_allclose(probs, 1.0, atol=1e-5)


def test_class_regions_follow_tile_classes(slide_dir: Path, syn_spec) -> None:
    rebuild_report(slide_dir, report_config(min_region_um2=0.0))
    st = SlideStore(slide_dir, mode="r")
    feats = qupath_read(slide_dir / "annotations.geojson")
    regions = {f["classification"]["name"]: f for f in feats
               if f["objectType"] == "annotation" and f.get("name", "").endswith("region")}
    tumor = regions["Tumor"]["geometry"]
    coords = st.read_grid().coords
    zs = st.read_zeroshot()
    assert zs is not None
    top = zs.top
    centres = shapely.points(coords + 112)
    inside = shapely.contains(tumor, centres)
    # the one uncertain tile (row 0) is left out; other Tumor tiles are inside
    expect = (top == 0)
    expect[0] = False
    tissue = shapely.union_all([f["geometry"] for f in feats
                                if f["classification"]["name"] == "Tissue"])
    on_tissue = shapely.contains(tissue, centres)
    np.testing.assert_array_equal(inside[on_tissue], expect[on_tissue])
    assert tumor.within(tissue.buffer(1e-6))  # clipped to tissue
    m = regions["Tumor"]["measurements"]
    assert m["Area mm^2"] == pytest.approx(tumor.area * 0.25 / 1e6)
    assert m["Fraction of tissue"] == pytest.approx(
        tumor.area * 0.25 / st.read_tissue().area_um2)


def test_regions_dissolve_and_drop_islands() -> None:
    # a 2x2 block of class 0, one lone tile of class 0, the rest class 1 on a 4x4 grid
    coords = np.array([(x, y) for y in range(0, 400, 100) for x in range(0, 400, 100)],
                      np.int64)
    top = np.ones(16, np.int16)
    top[[0, 1, 4, 5, 15]] = 0
    layout = TileGrid(coords=coords, tissue_fraction=np.ones(16, np.float32), level=0,
                      level_downsample=1.0, read_px=100, stride_px=100, tile_px=100,
                      target_mpp=0.5, mpp=0.5, delivered_mpp=0.5)
    regions = class_regions(layout, top, ["A", "B"], [(255, 0, 0), (0, 0, 255)],
                            tissue_area_um2=16 * 2500.0)
    a = regions[0]
    assert len(a.geometry.geoms) == 2 and a.n_tiles == 5
    assert a.area_mm2 == pytest.approx(5 * 2500 / 1e6) and a.fraction == pytest.approx(5 / 16)
    kept = class_regions(layout, top, ["A", "B"], [(255, 0, 0), (0, 0, 255)],
                         min_region_um2=2 * 2500.0)[0]
    assert len(kept.geometry.geoms) == 1 and kept.geometry.area == pytest.approx(40000)
    b = regions[1]
    assert b.geometry.is_valid and len(b.geometry.geoms) == 1  # one L-shaped piece
    assert b.area_mm2 == pytest.approx(11 * 2500 / 1e6)
    with pytest.raises(ValueError, match="top"):
        class_regions(layout, top[:3], ["A", "B"], [(1, 1, 1), (2, 2, 2)])


STREAM_SCRIPT = """
import resource, sys, numpy as np
from pathlib import Path
from wsi_assist.geojson import write_features
from wsi_assist.report import qupath
from wsi_assist.store import SlideStore
n, tmp = int(sys.argv[1]), Path(sys.argv[2])
st = SlideStore(tmp, mode="w")
rng = np.random.default_rng(1)
st.write_submodel("p", {"points": rng.uniform(0, 1e5, (n, 2)),
                        "labels": rng.integers(0, 2, n).astype(np.int16),
                        "scores": rng.random(n).astype(np.float32)},
                  {"task": "point-detection", "classes": ["a", "b"],
                   "colors": [[1, 2, 3], [4, 5, 6]]})
del st
sub = SlideStore(tmp, mode="r").read_submodels()[0]
feats = qupath.detection_features(sub)
print(type(feats).__name__)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = write_features(tmp / "a.geojson", feats)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(count, (after - before) * 1024)
"""


def test_detections_are_streamed(tmp_path: Path) -> None:
    """200k points go to disk chunk by chunk: the peak memory grows by far less than the
    file's size (a list of 200k feature dicts would take several times the file)."""
    res = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, "200000", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    kind, line = res.stdout.split("\n")[:2]
    count, grew = (int(v) for v in line.split())
    size = (tmp_path / "a.geojson").stat().st_size
    assert kind == "generator" and count == 200_000
    assert size > 40e6 and grew < size / 4, (grew, size)
    feats = qupath_read_sample(tmp_path / "a.geojson", 1000)
    assert all(f["objectType"] == "detection" for f in feats)


def qupath_read_sample(path: Path, n: int) -> list[dict]:
    """The first ``n`` features of a big file, checked like :func:`qupath_read`."""
    small = path.with_name("sample.geojson")
    with path.open(encoding="utf-8") as f:
        lines = [next(f) for _ in range(n + 1)]
    lines[-1] = lines[-1].rstrip().rstrip(",") + "\n"
    small.write_text("".join(lines) + "]}\n", encoding="utf-8")
    return qupath_read(small)
