"""Tissue detection against drawn tissue, and the tile grid's exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely import affinity

from wsi_assist import tiling, tissue
from wsi_assist.slide import SlideInfo, describe, open_slide, read_lowres
from wsi_assist.synthetic import SyntheticSlide
from wsi_assist.settings import TilingParams, TissueParams


def drawn_geometry(spec: SyntheticSlide) -> shapely.Geometry:
    circles = [affinity.scale(shapely.Point(e.cx, e.cy).buffer(1.0, 64), e.rx, e.ry)
               for e in spec.ellipses]
    return shapely.union_all(circles)


def detect_file(path: Path, params: TissueParams = TissueParams()
                ) -> tuple[SlideInfo, tissue.Tissue]:
    info = describe(path)
    with open_slide(path) as s:
        overview, ds = read_lowres(s, info, params.overview_mpp)
    return info, tissue.detect(overview, ds, info.require_mpp(), params)


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide", "odd_slide"])
def test_detected_area_matches_drawn(request: pytest.FixtureRequest, fixture: str,
                                     syn_spec: SyntheticSlide) -> None:
    path = request.getfixturevalue(fixture)
    params = TissueParams()
    if describe(path).mpp == 0.25:  # a 512 um wide slide: look closer, keep small pieces
        params = TissueParams(overview_mpp=2.0, min_area_um2=2000.0, smoothing_um=4.0)
    info, found = detect_file(path, params)
    assert found.background == "bright"
    assert len(found.polygons) == 3
    assert found.geometry.area == pytest.approx(syn_spec.tissue_area, rel=0.05)
    drawn = drawn_geometry(syn_spec)
    overlap = found.geometry.intersection(drawn).area / drawn.union(found.geometry).area
    assert overlap > 0.93  # intersection over union


def test_blank_slide_has_no_tissue(blank_slide: Path) -> None:
    info, found = detect_file(blank_slide)
    assert found.geometry.is_empty
    g = tiling.grid(info, found.geometry)
    assert len(g) == 0 and g.coords.shape == (0, 2)


def test_dark_background_is_detected() -> None:
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:150, 80:220] = (40, 60, 200)  # DAPI-like blue on black
    found = tissue.detect(img, 16.0, 0.5)
    assert found.background == "dark"
    assert found.geometry.area == pytest.approx(100 * 140 * 16.0**2, rel=0.02)


def test_small_debris_dropped_and_small_holes_filled() -> None:
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (230, 150, 190)
    img[190:194, 190:194] = 245          # a 4 px hole (1024 um^2 at 8 um/px): filled
    img[120:160, 120:160] = 245          # a 40 px hole (102,400 um^2): kept
    img[10:13, 10:13] = (120, 60, 160)   # debris of 576 um^2: dropped
    found = tissue.detect(img, 16.0, 0.5, TissueParams(smoothing_um=0))
    assert len(found.polygons) == 1
    poly = found.polygons[0]
    assert len(poly.interiors) == 1
    assert poly.area == pytest.approx((200 * 200 - 40 * 40) * 256, rel=1e-6)


def test_mask_to_polygons_is_exact_and_keeps_holes() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False
    mp = tissue.mask_to_polygons(mask, downsample=2.0)
    assert mp.is_valid and len(mp.geoms) == 1
    assert mp.area == (36 - 4) * 4
    assert mp.bounds == (4.0, 4.0, 16.0, 16.0)


def _info(mpp: float = 0.5, dims: tuple[tuple[int, int], ...] = ((2000, 1200),),
          downsamples: tuple[float, ...] = (1.0,)) -> SlideInfo:
    return SlideInfo(path="x", format="generic-tiff", vendor=None, width=dims[0][0],
                     height=dims[0][1], level_count=len(dims), level_dimensions=dims,
                     level_downsamples=downsamples, mpp=mpp, mpp_source="metadata",
                     objective_power=None)


def test_grid_exact_coordinates() -> None:
    g = tiling.grid(_info(), shapely.box(0, 0, 1000, 600), TilingParams())
    # tiles start every 224 px; the last column covers 104/224 and the last row 152/224
    xs, ys = np.arange(0, 1000, 224), np.arange(0, 600, 224)
    expected = np.array([(x, y) for y in ys for x in xs])
    assert np.array_equal(g.coords, expected)
    assert g.tissue_fraction[-1] == pytest.approx((104 / 224) * (152 / 224), rel=1e-6)
    assert (g.level, g.read_px, g.delivered_mpp, g.resized) == (0, 224, 0.5, False)


def test_grid_min_tissue_and_overlap() -> None:
    tis = shapely.box(0, 0, 1000, 600)
    g = tiling.grid(_info(), tis, TilingParams(min_tissue=0.5))
    assert len(g) == 4 * 2 + 4  # x 0..672 full columns; last row 152/224 = 0.68 kept
    g = tiling.grid(_info(), tis, TilingParams(overlap_px=112, min_tissue=1.0))
    assert g.stride_px == 112
    assert set(np.unique(g.coords[:, 0])) == {0, 112, 224, 336, 448, 560, 672}


def test_grid_picks_coarsest_level_at_least_as_fine() -> None:
    info = _info(0.25, ((8000, 6000), (4000, 3000), (1000, 750)), (1.0, 2.0, 8.0))
    g = tiling.grid(info, shapely.box(0, 0, 8000, 6000))
    assert (g.level, g.read_px, g.resized, g.size_l0) == (1, 224, False, 448.0)
    # 0.4 um/px target: level 1 (0.5) is too coarse, level 0 (0.25) is read and resized
    g = tiling.grid(info, shapely.box(0, 0, 8000, 6000), TilingParams(target_mpp=0.4))
    assert (g.level, g.read_px, g.resized) == (0, 358, True)
    assert g.delivered_mpp == pytest.approx(0.25 * 358 / 224)


def test_grid_within_tolerance_is_not_resized() -> None:
    g = tiling.grid(_info(0.499), shapely.box(0, 0, 2000, 1200))
    assert not g.resized and g.delivered_mpp == 0.499


def test_grid_non_integer_downsample() -> None:
    info = _info(0.25, ((2048, 1536), (853, 640)), (1.0, 2048 / 853))
    g = tiling.grid(info, shapely.box(0, 0, 2048, 1536), TilingParams(target_mpp=0.6))
    assert g.level == 1
    assert np.array_equal(g.level_coords() * 1, np.rint(g.coords / g.level_downsample))
    lx = g.level_coords()[:, 0]
    assert set(np.unique(lx)) <= set(range(0, 853, g.stride_px))


def test_synthetic_tiles_lie_on_drawn_tissue(svs_slide: Path, syn_spec: SyntheticSlide) -> None:
    info, found = detect_file(svs_slide)
    g = tiling.grid(info, found.geometry)
    drawn = drawn_geometry(syn_spec)
    frac = tiling.tissue_fraction(g.coords, g.size_l0, drawn)
    assert frac.min() > 0.15  # every kept tile really is on drawn tissue
    all_xy = tiling.grid(info, shapely.box(0, 0, info.width, info.height),
                         TilingParams(min_tissue=0)).coords
    sure = tiling.tissue_fraction(all_xy, g.size_l0, drawn) >= 0.35
    kept = {tuple(c) for c in g.coords}
    assert {tuple(c) for c in all_xy[sure]} <= kept  # and no clear tissue tile is missed


def test_params_validate() -> None:
    with pytest.raises(ValueError, match="tile_px"):
        TilingParams(tile_px=4)
    with pytest.raises(ValueError, match="background"):
        TissueParams(background="blue")  # type: ignore[arg-type]


@pytest.mark.real_slides
@pytest.mark.parametrize("name, background", [("CMU-1-Small-Region.svs", "bright"),
                                              ("HE_example.ome.tif", "bright"),
                                              ("test3-DAPI-2-387.ndpi", "dark")])
def test_real_slides_have_tissue_and_tiles_only_on_it(shared_slides: Path, name: str,
                                                      background: str) -> None:
    info, found = detect_file(shared_slides / name)
    assert found.background == background
    slide_area = info.width * info.height
    assert 0.05 * slide_area < found.geometry.area < 0.95 * slide_area
    g = tiling.grid(info, found.geometry)
    assert len(g) > 5
    assert (g.tissue_fraction >= 0.25).all()
    centres = shapely.points(g.coords + g.size_l0 / 2)
    near = shapely.dwithin(found.geometry, centres, g.size_l0 / 2)
    assert near.all()
