"""The built-in nucleus analysis: known answers on synthetic stain images, tiles and blocks
that change nothing, QuPath objects in annotations.geojson, DAB scores only where DAB is,
and agreement with QuPath's published counts on the real Ki-67 crop."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from findings_helper import report_config
from scipy.spatial import cKDTree
from shapely.geometry import shape
from stage_helper import run_slide

from wsi_assist import config
from wsi_assist import nuclei as nu
from wsi_assist.errors import ConfigError
from wsi_assist.report import qupath
from wsi_assist.settings import NucleiParams, SettingsError
from wsi_assist.stages import rebuild_report
from wsi_assist.stain import DAB, HEMATOXYLIN, default_vectors
from wsi_assist.synthetic import SyntheticSlide, default_slide, write_slide

HDAB = default_vectors("brightfield-hdab")
HE = default_vectors("brightfield-he")
#: (haematoxylin OD, DAB OD) of the synthetic nuclei, cycling: negative, 1+, 2+, 3+ by
#: QuPath's default thresholds 0.2 / 0.4 / 0.6; the 3+ nuclei are dark brown, with
#: little haematoxylin (found on the optical-density sum, not on haematoxylin alone).
LEVELS = ((0.6, 0.0), (0.3, 0.3), (0.3, 0.5), (0.1, 0.8))
TILE = 64


def _unit(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return a / np.linalg.norm(a)


def stain_image(n: int = 8, spacing: int = 40, radius: float = 8.0,
                extra: list[tuple[float, float, float]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB made from known stain optical densities: an n x n lattice of discs of
    ``radius`` px with the :data:`LEVELS` in turn, on faint haematoxylin; ``extra``
    discs (x, y, r) of level 0. Returns the image and (x, y, h, dab) per lattice disc."""
    size = n * spacing
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    h, d = np.full((size, size), 0.02), np.zeros((size, size))
    truth = []
    for k in range(n * n):
        cx, cy = (k % n + 0.5) * spacing, (k // n + 0.5) * spacing
        hl, dl = LEVELS[k % len(LEVELS)]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        h[disc], d[disc] = hl, dl
        truth.append((cx, cy, hl, dl))
    for cx, cy, r in extra:
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        h[disc], d[disc] = LEVELS[0]
    od = h[..., None] * _unit(HEMATOXYLIN) + d[..., None] * _unit(DAB)
    noise = np.random.default_rng(0).normal(0, 1.5, od.shape)
    rgb = np.clip(np.rint(255 * 10**-od + noise), 0, 255).astype(np.uint8)
    return rgb, np.array(truth)


@pytest.fixture(scope="module")
def hdab() -> tuple[np.ndarray, np.ndarray, nu.Nuclei]:
    rgb, truth = stain_image()
    return rgb, truth, nu.detect_nuclei(rgb, 0.5, HDAB)


def test_known_nuclei_found_measured_and_classed(hdab) -> None:
    _, truth, found = hdab
    assert len(found) == len(truth)
    d, j = cKDTree(found.centroids).query(truth[:, :2])
    assert d.max() < 1.0 and len(set(j.tolist())) == len(truth)
    area = found.column("Nucleus: Area µm^2")[j]
    np.testing.assert_allclose(area, math.pi * 8**2 * 0.25, rtol=0.08)  # 50 µm^2
    np.testing.assert_allclose(found.column("Nucleus: Perimeter µm")[j], 2 * math.pi * 4,
                               rtol=0.1)
    assert (found.column("Nucleus: Circularity") > 0.9).all()
    np.testing.assert_allclose(found.column("Nucleus: Max caliper µm"), 8.0, rtol=0.1)
    np.testing.assert_allclose(found.column("Nucleus: DAB OD mean")[j], truth[:, 3], atol=0.03)
    np.testing.assert_allclose(found.column("Nucleus: Hematoxylin OD mean")[j], truth[:, 2],
                               atol=0.03)
    assert set(found.names) >= {"Nucleus: DAB OD max", "Nucleus: Hematoxylin OD std dev",
                                "Nucleus: Eccentricity", "Nucleus: Min caliper µm"}
    # single threshold (QuPath's default): Positive when DAB OD mean >= 0.2
    pos = nu.score_positivity(found, HDAB)
    assert pos.classes == ("Negative", "Positive") and pos.applicable
    assert pos.counts == {"Negative": 16, "Positive": 48}
    assert pos.positive_percent == pytest.approx(75.0)
    assert pos.intensity_counts == {"Negative": 16, "1+": 16, "2+": 16, "3+": 16}
    assert pos.h_score == pytest.approx(25 + 2 * 25 + 3 * 25)
    want = np.array([0 if lv[1] < 0.2 else 1 for lv in truth[:, 2:]])
    assert (pos.labels[j] == want).all()
    # three thresholds: Negative, 1+, 2+, 3+
    tiers = nu.score_positivity(found, HDAB, NucleiParams(singleThreshold=False))
    assert tiers.classes == ("Negative", "1+", "2+", "3+")
    assert (tiers.labels[j] == np.arange(len(truth)) % 4).all()
    assert tiers.colors[1] == (255, 215, 0) and tiers.colors[0] == (90, 90, 180)
    assert tiers.h_score == pytest.approx(150.0)


def test_dark_dab_nuclei_need_the_optical_density_sum(hdab) -> None:
    rgb, truth, found = hdab
    on_h = nu.detect_nuclei(rgb, 0.5, HDAB, NucleiParams(
        detectionImageBrightfield="Hematoxylin OD", threshold=0.15))
    d, _ = cKDTree(on_h.centroids).query(truth[:, :2]) if len(on_h) else (np.full(64, 99), 0)
    dark = truth[:, 3] >= 0.8
    assert (d[dark] > 2).mean() > 0.5  # haematoxylin alone misses most dark 3+ nuclei
    assert len(found) == len(truth)  # the sum (auto on H-DAB) finds them all


def test_no_dab_scores_without_dab(hdab) -> None:
    rgb, _, _ = hdab
    found = nu.detect_nuclei(rgb, 0.5, HE)
    assert "Nucleus: Eosin OD mean" in found.names
    assert not any("DAB" in n for n in found.names)
    pos = nu.score_positivity(found, HE)
    assert not pos.applicable and pos.positive_percent is None and pos.h_score is None
    assert pos.n_positive is None and pos.classes == ("Nucleus",)
    assert "not applicable" in pos.reason and "H&E" in pos.reason
    s = nu.summary(found, pos, 1.0)
    assert s["positive_percent"] is None and s["dab"] == pos.reason
    with pytest.raises(ValueError, match="fluorescence"):
        nu.detect_nuclei(rgb, 0.5, default_vectors("fluorescence"))


def test_touching_nuclei_split_small_and_large_dropped() -> None:
    # two overlapping discs; a speck of 2 µm^2 (< minAreaMicrons 10); a blob of 700 µm^2
    rgb, truth = stain_image(n=2, spacing=200, extra=[(190, 30, 8), (204, 30, 8),
                                                      (30, 200, 1.6), (200, 200, 30)])
    found = nu.detect_nuclei(rgb, 0.5, HDAB)
    pair = np.hypot(*(found.centroids - [197, 30]).T) < 12
    assert pair.sum() == 2
    assert len(found) == len(truth) + 2
    rings = [shapely.Polygon(found.outline(i)) for i in range(len(found))]
    assert all(r.is_valid for r in rings)
    a, b = (rings[i] for i in np.flatnonzero(pair))
    assert a.intersection(b).area < 1.0  # split, not overlapping


def test_finer_images_are_analysed_at_the_requested_pixel_size(hdab) -> None:
    """A 0.25 µm/px image is averaged down to 0.5: the same nuclei, coordinates and areas
    in the frame of the image given."""
    from PIL import Image

    rgb, truth, found = hdab
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2),
                                                 Image.Resampling.NEAREST))
    fine = nu.detect_nuclei(big, 0.25, HDAB)
    assert len(fine) == len(found)
    d, _ = cKDTree(fine.centroids / 2).query(truth[:, :2])
    assert d.max() < 1.0
    np.testing.assert_allclose(np.median(fine.column("Nucleus: Area µm^2")),
                               np.median(found.column("Nucleus: Area µm^2")), rtol=0.05)


def test_nuclei_validate_themselves() -> None:
    names = ("Nucleus: Area µm^2",)
    with pytest.raises(ValueError, match="offsets"):
        nu.Nuclei(np.zeros((1, 2)), np.zeros((2, 2), np.float32), np.array([0, 2]),
                  np.zeros((1, 1), np.float32), names)
    with pytest.raises(ValueError, match="measurements"):
        nu.Nuclei(np.zeros((1, 2)), np.zeros((3, 2), np.float32), np.array([0, 3]),
                  np.zeros((1, 2), np.float32), names)
    with pytest.raises(ValueError, match="reason"):
        nu.Positivity(np.zeros(0, np.int16), ("Negative",), ((0, 0, 0),), True, "why")
    one = nu.Nuclei(np.ones((1, 2)), np.zeros((3, 2), np.float32), np.array([0, 3]),
                    np.zeros((1, 1), np.float32), names)
    both = nu.Nuclei.concat([one, one.transformed((10.0, 0.0), 2.0)], names)
    assert both.centroids.tolist() == [[1, 1], [12, 2]] and both.offsets.tolist() == [0, 3, 6]
    assert len(both.select(np.array([False, True]))) == 1


def test_settings_carry_qupath_names_and_check_themselves() -> None:
    p = NucleiParams()
    q = p.qupath()
    assert q["requestedPixelSizeMicrons"] == 0.5 and q["backgroundRadiusMicrons"] == 8.0
    assert q["sigmaMicrons"] == 1.5 and q["threshold"] == 0.1 and q["maxBackground"] == 2.0
    assert (q["thresholdPositive1"], q["thresholdPositive2"], q["thresholdPositive3"]) == (
        0.2, 0.4, 0.6)
    assert "stains" not in q and "haloMicrons" not in q
    with pytest.raises(SettingsError, match="thresholdPositive1 <= thresholdPositive2"):
        NucleiParams(singleThreshold=False, thresholdPositive2=0.1)
    with pytest.raises(SettingsError, match="minAreaMicrons must be < maxAreaMicrons"):
        NucleiParams(minAreaMicrons=500.0)
    with pytest.raises(ConfigError, match="nuclei.thresholdCompartment: must be one of"):
        config.override(config.load(), nuclei={"thresholdCompartment": "Cell: DAB OD mean"})


# -- through the stage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn() -> SyntheticSlide:
    return default_slide(1024, 768, seed=3)


@pytest.fixture(scope="module")
def syn_slide(tmp_path_factory: pytest.TempPathFactory, syn: SyntheticSlide) -> Path:
    return write_slide(tmp_path_factory.mktemp("nu") / "syn.svs", syn, mpp=0.5, quality=95)


def _run(slide: Path, out: Path, **nuclei) -> object:
    cfg = config.override(config.load(), tiling={"tile_px": TILE},
                          parallelism={"device": "cpu"}, submodels={"specs": ["nuclei"]},
                          nuclei=nuclei)
    return run_slide(slide, out, cfg, ("tissue", "tiles", "submodels"))[0]


@pytest.fixture(scope="module")
def runs(syn_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The slide analysed tile by tile (64 px tiles, each with its halo) and in blocks."""
    return {"tiles": _run(syn_slide, tmp_path_factory.mktemp("t"), analysisTileMicrons=32.0),
            "blocks": _run(syn_slide, tmp_path_factory.mktemp("b"), stains="brightfield-hdab",
                           analysisTileMicrons=64.0)}


@pytest.mark.parametrize("how", ["tiles", "blocks"])
def test_nuclei_across_tile_borders_found_whole_and_once(runs, syn, how) -> None:
    store = runs[how].store
    sub = store.read_submodel("nuclei")
    grid = store.read_grid()
    pts = sub.read("points")
    nuc = syn.nuclei()
    truth = nuc[grid.owners(nuc) >= 0]
    d, _ = cKDTree(pts).query(truth)
    r = syn.nucleus_radius
    assert len(truth) > 200 and (d < 1.5).mean() >= 0.98
    assert len(set(cKDTree(truth).query(pts)[1].tolist())) >= len(pts) - 2  # no doubles
    rel = (truth - grid.coords.min(axis=0)) % grid.size_l0
    cut = np.minimum(rel, grid.size_l0 - rel).min(axis=1) < r  # cut by a tile border
    assert cut.sum() > 50
    hits = cKDTree(pts).query_ball_point(truth[cut], r=r)
    assert np.mean([len(h) == 1 for h in hits]) >= 0.98
    area = sub.read("measurements")[:, sub.measurement_names.index("Nucleus: Area µm^2")]
    near = cKDTree(pts).query(truth[cut])[1]
    assert np.median(area[near]) == pytest.approx(math.pi * r**2 * 0.25, rel=0.15)  # whole
    a = sub.attrs
    assert a["task"] == "nucleus-detection" and a["parameters"]["sigmaMicrons"] == 1.5
    dens = a["scores"]["nucleus_density_per_mm2"]["value"]
    assert 0.85 * 1e6 / 144 < dens < 1.15 * 1e6 / 144  # one nucleus per (12 µm)^2


def test_annotations_hold_qupath_nuclei(runs, tmp_path) -> None:
    for how, classified in (("tiles", False), ("blocks", True)):
        store = runs[how].store
        rebuild_report(store.folder, report_config())
        feats = json.loads((store.folder / "annotations.geojson").read_text())["features"]
        cells = [f for f in feats if f["properties"].get("metadata", {}).get("sub-model")
                 == "nuclei"]
        sub = store.read_submodel("nuclei")
        assert len(cells) == len(sub.read("points")) > 200
        names = set()
        for f in cells:
            p = f["properties"]
            assert p["objectType"] == "detection" and f["geometry"]["type"] == "Polygon"
            ring = f["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) >= 4
            assert shape(f["geometry"]).is_valid
            assert all(isinstance(v, float) and math.isfinite(v)
                       for v in p["measurements"].values())
            names |= set(p["measurements"])
            if classified:
                c = p["classification"]
                assert (c["name"], c["color"]) in (("Positive", [200, 50, 50]),
                                                   ("Negative", [90, 90, 180]))
            else:
                assert "classification" not in p
        assert {"Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Nucleus: Circularity",
                "Nucleus: Hematoxylin OD mean"} <= names
        poly = shape(cells[0]["geometry"])
        assert poly.contains(shapely.Point(sub.read("points")[0]))
        md = (store.folder / "report.md").read_text()
        assert "requestedPixelSizeMicrons 0.5" in md and "thresholdPositive1 0.2" in md
        if classified:
            assert "**Positive**: not applicable" not in md
        else:  # the score's label, and "not applicable" said once
            assert "**Positive**: not applicable (this is an H&E" in md
            html = (store.folder / "report.html").read_text()
            assert "not applicable" in html
    assert list(qupath.nucleus_features(runs["tiles"].store.read_submodel("nuclei")))


# -- real slides ------------------------------------------------------------------------------


@pytest.mark.real_slides
def test_ki67_agrees_with_qupath(shared_slides) -> None:
    """QuPath 0.3.2's published counts on OS-2-vsi-Ki67 at its four settings: cells within
    20 % and positive % within 3 points (the whole image, as its select-all annotation)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import accuracy

    path = shared_slides / "OS-2-vsi-Ki67.ome.tif"
    for det in (0.2, 0.4):
        params = accuracy.params_for("published", det, None)
        found, area, _ = accuracy.whole_image(path, None, HDAB, params)
        assert area == pytest.approx(1445**2 * 0.3461**2 / 1e6, rel=1e-3)
        for dab in (0.2, 0.5):
            pos = nu.score_positivity(found, HDAB, accuracy.params_for("published", det, dab))
            cells, pct = accuracy.QUPATH[(det, dab)]
            assert abs(len(found) - cells) <= 0.2 * cells, (det, dab, len(found))
            assert abs(pos.positive_percent - pct) <= 3, (det, dab, pos.positive_percent)


@pytest.mark.real_slides
def test_real_he_and_fluorescence_slides(shared_slides, tmp_path) -> None:
    """H&E: real nucleus densities (2,000-20,000 /mm^2) and sizes, DAB scores not
    applicable. (DAPI fluorescence: tests/test_nuclei_fluorescence.py.)"""
    for name in ("CMU-1-Small-Region.svs", "HE_example.ome.tif"):
        cfg = config.override(config.load(), parallelism={"device": "cpu"},
                              submodels={"specs": ["nuclei"]})
        ctx = run_slide(shared_slides / name, tmp_path / name, cfg,
                        ("tissue", "tiles", "submodels"))[0]
        a = ctx.store.read_submodel("nuclei").attrs
        s = a["scores"]
        assert 2000 < s["nucleus_density_per_mm2"]["value"] < 20000, (name, s)
        assert 12 < s["median_nucleus_area_um2"]["value"] < 60, (name, s)
        assert s["positive_percent"]["value"] is None
        assert "not applicable" in s["positive_percent"]["not_applicable"]
        assert s["h_score"]["value"] is None and not a["classified"]


def test_stains_come_from_the_store_when_stored(tmp_path) -> None:
    from wsi_assist.stages import nuclei as builtin
    from wsi_assist.store import SlideStore

    stored = SlideStore(tmp_path / "a", mode="w")
    stored.write_stains(HDAB)  # as the tissue stage's stain estimation does
    got = builtin.slide_stains(stored, "auto")
    assert got.kind == "brightfield-hdab"
    np.testing.assert_allclose(got.matrix, HDAB.matrix, atol=1e-5)
    bare = SlideStore(tmp_path / "b", mode="w")
    assert builtin.slide_stains(bare, "auto").kind == "brightfield-he"
    assert builtin.slide_stains(bare, "brightfield-hdab").kind == "brightfield-hdab"


def test_owners_share_out_overlapping_tiles_and_blocks_cover_them() -> None:
    from wsi_assist.tiling import TileGrid

    xy = np.array([(x, y) for y in (0, 48, 96) for x in (0, 48, 96) if (x, y) != (96, 96)])
    g = TileGrid(coords=xy.astype(np.int64), tissue_fraction=np.ones(len(xy), np.float32),
                 level=0, level_downsample=1.0, read_px=64, stride_px=48, tile_px=64,
                 target_mpp=0.5, mpp=0.5, delivered_mpp=0.5)
    yy, xx = np.mgrid[0:170, 0:170] + 0.5
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    own = g.owners(pts)
    inside = shapely.contains_xy(shapely.union_all(g.boxes()), pts[:, 0], pts[:, 1])
    assert ((own >= 0) == inside).all()  # every point of the union has one owner
    for i, box in enumerate(g.boxes()):  # ... which holds it: the lowest, then rightmost
        mine = pts[own == i]
        assert shapely.contains_xy(box, mine[:, 0], mine[:, 1]).all()
    assert g.owners(np.array([[100.0, 100.0]])).tolist() == [7]  # (48, 96): lowest
    assert g.owners(np.array([[100.0, 60.0]])).tolist() == [5]  # (96, 48): rightmost
    blocks, of = g.blocks(2, 10)
    assert len(blocks) == 3 and blocks.read_px == 48 + 64 + 20 and of.tolist() == [
        0, 0, 1, 0, 0, 1, 2, 2]
    for i, b in enumerate(of):
        assert g.boxes()[i].within(blocks.boxes()[b])


# -- nucleus-vs-stroma/ink rejection, mpp plausibility (issue 13) ---------------------------

INK_OD = (0.85, 0.2, 0.3)  # teal marking ink: absorbs red, passes green


def he_image() -> tuple[np.ndarray, dict[str, list[tuple[float, float]]]]:
    """uint8 RGB from known H&E optical densities on eosin-stained stroma (H 0.05, E 0.3):
    dark nuclei (H 0.8), pale bluish stroma wisps (H 0.3: above QuPath's threshold of
    0.1 over the background, but only 0.25 above their surroundings) and teal ink blobs,
    discs of radius 6 px at 0.5 um/px, on a 5 x 3 lattice; the centres of each kind."""
    from wsi_assist.stain import EOSIN

    size, spacing = 5 * 48, 48
    yy, xx = np.mgrid[0:3 * spacing, 0:size] + 0.5
    h, e = np.full(xx.shape, 0.05), np.full(xx.shape, 0.3)
    ink = np.zeros(xx.shape)
    centres: dict[str, list[tuple[float, float]]] = {"nucleus": [], "stroma": [], "ink": []}
    for row, kind in enumerate(("nucleus", "stroma", "ink")):
        for col in range(5):
            cx, cy = (col + 0.5) * spacing, (row + 0.5) * spacing
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 36
            if kind == "nucleus":
                h[disc] = 0.8
            elif kind == "stroma":
                h[disc] = 0.3
            else:
                ink[disc] = 0.9
            centres[kind].append((cx, cy))
    od = (h[..., None] * _unit(HEMATOXYLIN) + e[..., None] * _unit(EOSIN)
          + ink[..., None] * _unit(INK_OD))
    noise = np.random.default_rng(1).normal(0, 1.0, od.shape)
    return np.clip(np.rint(255 * 10**-od + noise), 0, 255).astype(np.uint8), centres


def _found_at(found: nu.Nuclei, centres: list[tuple[float, float]]) -> int:
    if not len(found):
        return 0
    d, _ = cKDTree(found.centroids).query(np.asarray(centres))
    return int((d < 3).sum())


def test_stroma_and_ink_rejected_on_he_nuclei_kept() -> None:
    rgb, centres = he_image()
    he = default_vectors("brightfield-he")
    off = NucleiParams(minNucleusContrast=0, maxStainAngle=0)
    plain = nu.detect_nuclei(rgb, 0.5, he, off)
    # without the rejection, QuPath's steps take the wisps and the ink for nuclei
    assert _found_at(plain, centres["stroma"]) == 5 and _found_at(plain, centres["ink"]) >= 4
    found = nu.detect_nuclei(rgb, 0.5, he, NucleiParams())
    assert _found_at(found, centres["nucleus"]) == 5
    assert _found_at(found, centres["stroma"]) == 0 and _found_at(found, centres["ink"]) == 0
    assert len(found) == 5
    # each rule does its own part
    only_contrast = nu.detect_nuclei(rgb, 0.5, he, NucleiParams(maxStainAngle=0))
    assert _found_at(only_contrast, centres["stroma"]) == 0
    only_angle = nu.detect_nuclei(rgb, 0.5, he, NucleiParams(minNucleusContrast=0))
    assert _found_at(only_angle, centres["ink"]) == 0
    assert _found_at(only_angle, centres["stroma"]) == 5


def test_rejection_leaves_hdab_slides_alone(hdab) -> None:
    rgb, _, found = hdab
    again = nu.detect_nuclei(rgb, 0.5, default_vectors("brightfield-hdab"),
                             NucleiParams(detectionImageBrightfield="Optical density sum",
                                          minNucleusContrast=5.0, maxStainAngle=0.1))
    assert len(again) == len(found)


def test_density_warning_only_outside_the_plausible_range() -> None:
    p = NucleiParams()
    assert nu.density_warning(4000, 1.0, p) is None
    assert nu.density_warning(30, 1.0, p) is None  # too few nuclei to judge
    low = nu.density_warning(100, 1.0, p)
    assert low is not None and "mpp may be wrong" in low and "100 nuclei/mm^2" in low
    assert nu.density_warning(70_000, 1.0, p) is not None
    assert nu.density_warning(100, 1.0, NucleiParams(minPlausibleDensity=0)) is None


@pytest.mark.real_slides
def test_real_slide_claimed_at_a_wrong_mpp_warns(shared_slides, tmp_path) -> None:
    """A real H&E crop written with its true resolution and with one 4x too coarse (as
    a scanner or converter that gets the units wrong): only the wrong one warns."""
    import tifffile

    from wsi_assist.settings import TilingParams
    from wsi_assist.slide import describe, open_slide
    from wsi_assist.stages import nuclei as builtin
    from wsi_assist.stream import stream
    from wsi_assist.tiling import grid as make_grid

    with open_slide(shared_slides / "HE_example.ome.tif") as s:
        rgb = np.asarray(s.read_region((300, 300), 0, (384, 384), as_array=True))[..., :3]
    he, params = default_vectors("brightfield-he"), NucleiParams()
    warned = {}
    for mpp in (0.5, 2.0):
        path = tmp_path / f"he_{mpp}.tif"
        tifffile.imwrite(path, np.ascontiguousarray(rgb), tile=(128, 128), photometric="rgb",
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        info = describe(path)
        assert info.mpp == pytest.approx(mpp)
        g = make_grid(info, shapely.box(0, 0, 384, 384), TilingParams(min_tissue=0.0))
        blocks, block_of = builtin.analysis_grid(g, params)
        found = builtin.analyse(stream(path, blocks, batch_size=2), g, blocks, block_of, he,
                                params, info.level_dimensions[g.level])
        area_mm2 = 384 * 384 * mpp**2 / 1e6
        warned[mpp] = (len(found) / area_mm2,
                       nu.density_warning(len(found), area_mm2, params))
    assert warned[0.5][1] is None, warned
    assert warned[2.0][1] is not None and "mpp may be wrong" in warned[2.0][1], warned
