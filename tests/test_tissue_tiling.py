"""Tissue detection against drawn tissue, and the tile grid's exact geometry."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely import affinity

from wsi_assist import tiling, tissue
from wsi_assist.lowres import read_lowres
from wsi_assist.settings import TilingParams, TissueParams
from wsi_assist.slide import SlideInfo, describe, open_slide
from wsi_assist.synthetic import Ellipse, SyntheticSlide, write_slide


def drawn_geometry(spec: SyntheticSlide) -> shapely.Geometry:
    circles = [affinity.scale(shapely.Point(e.cx, e.cy).buffer(1.0, 64), e.rx, e.ry)
               for e in spec.ellipses]
    return shapely.union_all(circles)


def detect_file(path: Path, params: TissueParams = TissueParams()
                ) -> tuple[SlideInfo, tissue.Tissue]:
    info = describe(path)
    with open_slide(path) as s:
        want = tissue.overview_mpp(info.width, info.height, info.require_mpp(), params,
                                   info.level_downsamples)
        overview, ds = read_lowres(s, info, want)
    return info, tissue.detect(overview, ds, info.require_mpp(), params)


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide", "odd_slide"])
def test_detected_area_matches_drawn(request: pytest.FixtureRequest, fixture: str,
                                     syn_spec: SyntheticSlide) -> None:
    path = request.getfixturevalue(fixture)
    params = TissueParams()
    if describe(path).mpp == 0.25:  # a 512 um wide slide: look closer, keep small pieces
        # overview_min_px 200 keeps a 2 um/px overview, read from odd_slide's 2.4x level
        params = TissueParams(overview_mpp=2.0, overview_min_px=200, min_area_um2=2000.0,
                              smoothing_um=4.0)
    _, found = detect_file(path, params)
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


# -- known answers on drawn images: pale IHC, no glass, a small core, fluorescence --------

def _iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


def _raster(geom: shapely.Geometry, h: int, w: int) -> np.ndarray:
    """Which pixel centres of an (h, w) image lie in ``geom`` (pixel coordinates)."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return np.asarray(shapely.contains_xy(geom, xs.ravel(), ys.ravel())).reshape(h, w)


def _nuclei(inside: np.ndarray, spacing: float, radius: float, rng: np.random.Generator,
            jitter: float = 0.35) -> np.ndarray:
    """Label image of round nuclei on a jittered lattice, centres inside ``inside``."""
    h, w = inside.shape
    cy, cx = np.mgrid[spacing / 2:h:spacing, spacing / 2:w:spacing]
    cy = cy + rng.uniform(-jitter, jitter, cy.shape) * spacing
    cx = cx + rng.uniform(-jitter, jitter, cx.shape) * spacing
    ok = inside[np.clip(cy.astype(int), 0, h - 1), np.clip(cx.astype(int), 0, w - 1)]
    out = np.zeros((h, w), np.int32)
    ys, xs = np.mgrid[0:h, 0:w]
    r = int(np.ceil(radius))
    for k, (y, x) in enumerate(zip(cy[ok], cx[ok], strict=True), start=1):
        y0, x0 = int(y), int(x)
        sl = np.s_[max(y0 - r, 0):y0 + r + 1, max(x0 - r, 0):x0 + r + 1]
        disc = (ys[sl] - y) ** 2 + (xs[sl] - x) ** 2 <= radius**2
        out[sl][disc] = k
    return out


def _paint(base: tuple[int, int, int], shape: tuple[int, int], noise: float,
           rng: np.random.Generator) -> np.ndarray:
    return np.asarray(base, np.float32) + rng.normal(0, noise, (*shape, 1)).astype(np.float32)


def _blob() -> shapely.Geometry:
    """An irregular section: an ellipse with a rounded lobe, in px of a 1000 x 900 image."""
    body = affinity.scale(shapely.Point(470, 430).buffer(1.0, 128), 330, 260)
    lobe = shapely.Point(760, 640).buffer(150, 64)
    return shapely.union_all([body, lobe]).simplify(0.2)


def _pale_ihc(rng: np.random.Generator, truth: shapely.Geometry | None, h: int = 900,
              w: int = 1000) -> np.ndarray:
    """Ki-67-like brightfield at 0.5 um/px: dim grey glass (216), almost colourless
    cytoplasm and pale blue haematoxylin nuclei, a few brown; ``truth`` None: no glass."""
    inside = np.ones((h, w), bool) if truth is None else _raster(truth, h, w)
    img = _paint((216, 216, 216), (h, w), 1.0, rng)
    cyto = _paint((204, 207, 211), (h, w), 4.0, rng)
    img[inside] = cyto[inside]
    nuc = _nuclei(inside, spacing=26, radius=8, rng=rng)
    brown = (nuc % 7 == 0) & (nuc > 0)
    img[(nuc > 0) & ~brown] = (150, 178, 206)
    img[brown] = (120, 84, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_pale_ihc_with_low_saturation_is_found_whole() -> None:
    truth = _blob()
    img = _pale_ihc(np.random.default_rng(1), truth)
    inside = _raster(truth, *img.shape[:2])
    assert np.median(tissue.saturation(img)[inside]) < 0.1  # pale, unsaturated tissue
    found = tissue.detect(img, 1.0, 0.5)
    assert found.method == "brightfield-od" and found.levels["glass_r"] == pytest.approx(216, abs=1)
    assert len(found.polygons) == 1 and not found.polygons[0].interiors
    assert _iou(found.geometry, truth) > 0.95
    assert found.geometry.length / truth.length == pytest.approx(1.0, abs=0.08)  # smooth


def test_crop_without_glass_is_all_tissue() -> None:
    """Tissue to every edge, half pale and half dark: Otsu would split it in two."""
    rng = np.random.default_rng(2)
    img = _pale_ihc(rng, None, 900, 1000)
    img[:, 500:] = np.clip(_paint((150, 90, 160), (900, 500), 12.0, rng), 0, 255)  # dense H&E
    found = tissue.detect(img, 1.0, 0.5)
    assert found.method == "brightfield-no-glass"
    assert len(found.polygons) == 1
    assert found.geometry.area / (900 * 1000) > 0.99
    assert found.geometry.bounds == pytest.approx((0, 0, 1000, 900), abs=1)


def test_small_core_is_detected_at_full_resolution(tmp_path: Path) -> None:
    """A 600 um TMA core in a 700 um image: read at level 0, not 8 um/px (88 px)."""
    core = SyntheticSlide(1400, 1400, ellipses=(Ellipse(700, 700, 600, 600),))
    path = write_slide(tmp_path / "core.svs", core, kind="svs", mpp=0.5)
    assert tissue.overview_mpp(1400, 1400, 0.5) == 0.7  # read_lowres: floor(1.4) = level 0
    _, found = detect_file(path)
    assert found.downsample == 1.0 and found.mask.shape == (1400, 1400)
    truth = shapely.Point(700, 700).buffer(600, 256)
    assert len(found.polygons) == 1
    assert _iou(found.geometry, truth) > 0.98
    assert found.geometry.length / truth.length == pytest.approx(1.0, abs=0.03)


def _fluorescence(rng: np.random.Generator, truth: shapely.Geometry, autofluorescence: float,
                  h: int = 900, w: int = 1000) -> np.ndarray:
    """DAPI-like at 1 um/px: black background, nuclei (r 4 um, ~16 um apart) in ``truth``."""
    inside = _raster(truth, h, w)
    blue = rng.poisson(2.0, (h, w)).astype(np.float32)
    blue[inside] += autofluorescence
    nuc = _nuclei(inside, spacing=16, radius=4, rng=rng, jitter=0.45)
    bright = rng.uniform(70, 220, nuc.max() + 1)
    blue[nuc > 0] = bright[nuc[nuc > 0]]
    img = np.zeros((h, w, 3), np.float32)
    img[..., 2] = blue
    img[..., 1] = 0.25 * blue
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("autofluorescence", [0.0, 9.0])
def test_fluorescence_nuclei_are_joined_into_the_section(autofluorescence: float) -> None:
    truth = _blob()
    img = _fluorescence(np.random.default_rng(3), truth, autofluorescence)
    found = tissue.detect(img, 1.0, 1.0)
    assert found.background == "dark" and found.method == "fluorescence"
    areas = sorted((p.area for p in found.polygons), reverse=True)
    assert areas[0] > 0.98 * sum(areas)  # one main piece
    assert _iou(found.geometry, truth) > (0.95 if autofluorescence else 0.9)
    assert found.geometry.length / truth.length == pytest.approx(1.0, abs=0.12)


def test_staircase_free_outline_on_a_coarse_overview() -> None:
    """An 80 px disc on an 8 um/px overview: the outline is round, not a staircase
    (a pixel-edge outline is 4/pi = 1.27 times as long)."""
    img = np.full((120, 120, 3), 240, np.uint8)
    truth = shapely.Point(60, 60).buffer(40, 256)
    img[_raster(truth, 120, 120)] = (200, 120, 170)
    found = tissue.detect(img, 16.0, 0.5)
    scaled = affinity.scale(truth, 16, 16, origin=(0, 0))
    assert _iou(found.geometry, scaled) > 0.98
    assert found.geometry.length / scaled.length == pytest.approx(1.0, abs=0.03)
    stairs = tissue.mask_to_polygons(found.mask, 16.0)
    assert stairs.length / scaled.length > 1.2


def test_overview_resolution_adapts_to_the_slide() -> None:
    assert tissue.overview_mpp(1380, 1484, 0.5) == 0.742          # small: level 0 is read
    assert tissue.overview_mpp(2220, 2967, 0.5) == pytest.approx(2967 * 0.5 / 1000)
    assert tissue.overview_mpp(100_000, 80_000, 0.25) == 8.0      # a slide: 3,125 px
    # a 3,072 px slide with a 4x level: that level's 768 px, not level 0 decoded for 1,024
    assert tissue.overview_mpp(3072, 2304, 0.5, level_downsamples=(1.0, 4.0)) == 2.0
    assert tissue.overview_mpp(3072, 2304, 0.5, level_downsamples=(1.0, 8.0)) == 1.536
    huge = tissue.overview_mpp(400_000, 400_000, 0.25)            # capped at 16 MP
    assert huge == pytest.approx(0.25 * 400_000 / 4000)
    with pytest.raises(ValueError, match="od_floor"):
        TissueParams(od_floor=0.2, od_ceiling=0.1)


def test_no_tissue_is_flagged_in_manifest_index_and_report(blank_slide: Path,
                                                           tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_assist.cli import app
    from wsi_assist.report import data
    from wsi_assist.store import SlideStore

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["tile", str(blank_slide), "-o", str(out)])
    assert r.exit_code == 0, r.output
    with (out / "manifest.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "done" and row["warnings"] == tissue.NO_TISSUE
    assert f"Warning: {tissue.NO_TISSUE}" in (out / "index.html").read_text()
    store = SlideStore(out / "blank", "r")
    assert store.read_tissue().method == "brightfield-od"
    assert data.qc(store, None, 0.5)["warnings"] == [tissue.NO_TISSUE]
    r = CliRunner().invoke(app, ["tile", str(blank_slide), "-o", str(out)])  # skipped: kept
    with (out / "manifest.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "skipped" and row["warnings"] == tissue.NO_TISSUE


# -- real slides --------------------------------------------------------------------------

@pytest.mark.real_slides
@pytest.mark.parametrize("name, lo, hi, method", [
    ("CMU-1-Small-Region.svs", 0.5, 0.75, "brightfield-od"),      # skin, 1.64 mm^2 image
    ("HE_example.ome.tif", 0.33, 0.40, "brightfield-od"),         # a 0.69 mm core
    ("OS-2-vsi-Ki67.ome.tif", 0.19, 0.24, "brightfield-od"),      # 0.25 mm^2 crop
    ("test3-DAPI-2-387.ndpi", 0.6, 1.0, "fluorescence")])        # 1.0 mm^2 image
def test_real_slide_tissue_areas(shared_slides: Path, name: str, lo: float, hi: float,
                                 method: str) -> None:
    info, found = detect_file(shared_slides / name)
    assert found.method == method
    assert lo < found.area_um2 / 1e6 < hi
    areas = sorted((p.area for p in found.polygons), reverse=True)
    assert areas[0] > 0.95 * sum(areas)  # one main piece
    if name.startswith("OS-2"):  # filled with tissue but for glass gaps between fragments
        glass, stained, inside = _glass_and_stain(shared_slides / name, found)
        # the outline leaves out the glass (about 17% of this crop) and nothing stained
        assert 0.1 < glass < 0.3
        assert abs(found.geometry.area / (info.width * info.height) - (1 - glass)) < 0.05
        assert (stained & inside).sum() > 0.98 * stained.sum()
    assert found.mask.shape[1] >= min(1000, info.width) * 0.99  # >= ~1,000 px across


def _glass_and_stain(path: Path, found: tissue.Tissue
                     ) -> tuple[float, np.ndarray, np.ndarray]:
    """The image's fraction of clear glass (pixels within 0.02 OD of its estimated
    background, opened by a 7 px square, in pieces of at least 100 um^2), its stained
    pixels (OD sum > 0.15) and the pixels inside the tissue outline."""
    from scipy import ndimage as ndi
    from skimage.draw import polygon as fill

    from wsi_assist.stain import estimate_background, optical_density

    info = describe(path)
    with open_slide(path) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions, as_array=True))[..., :3]
    od = optical_density(rgb, estimate_background(rgb)).sum(axis=-1)
    clear = ndi.binary_opening(od < 0.02, structure=np.ones((7, 7), bool))
    pieces, _ = ndi.label(clear)
    sizes = np.bincount(pieces.ravel())
    big = sizes * info.require_mpp() ** 2 >= 100
    big[0] = False
    inside = np.zeros(od.shape, bool)
    for poly in found.polygons:
        ring = np.asarray(poly.exterior.coords)
        inside[fill(ring[:, 1], ring[:, 0], od.shape)] = True
        for hole in poly.interiors:
            h = np.asarray(hole.coords)
            inside[fill(h[:, 1], h[:, 0], od.shape)] = False
    return float(big[pieces].mean()), od > 0.15, inside


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_large_synthetic_slide_is_tissue_at_40x_and_20x(tmp_path: Path, mpp: float) -> None:
    """The benchmarks' fast writer draws tissue-sized H&E at any pixel size: at 0.25 um/px
    (40x) as at 0.5 the tissue stage finds the drawn ellipses (the former mosaic of
    64 um tile fragments was all dropped as debris at 40x)."""
    from wsi_assist.synthetic import he_slide, write_large

    spec = he_slide(4096, 3072, mpp)
    path = write_large(tmp_path / "big.svs", spec, mpp)
    info, found = detect_file(path)
    assert info.mpp == mpp and len(info.level_downsamples) == 2
    assert found.method == "brightfield-od"
    drawn = drawn_geometry(spec)
    assert found.geometry.area == pytest.approx(drawn.area, rel=0.03)
    assert found.geometry.symmetric_difference(drawn).area < 0.05 * drawn.area
    with open_slide(path) as s:  # the lower level draws what level 0 does, 4 x smaller
        low = np.asarray(s.read_region((0, 0), 1, (1024, 768)).convert("RGB"), np.float32)
        top = np.asarray(s.read_region((0, 0), 0, (4096, 3072)).convert("RGB"), np.float32)
    # 16 um blocks at 0.25 um/px (32 at 0.5): the same colour on both levels
    low_means = low.reshape(48, 16, 64, 16, 3).mean(axis=(1, 3))
    top_means = top.reshape(48, 64, 64, 64, 3).mean(axis=(1, 3))
    assert np.abs(low_means - top_means).mean() < 3.0


def test_fast_morphology_equals_scipy() -> None:
    """Disc dilation/erosion by rows, hole filling by one labelling, the strided block
    mean and the upsampled mask give exactly what scipy's binary morphology,
    binary_fill_holes, a sum over the block axes and plain bilinear interpolation give."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((301, 257)), 3) > 0.5
    mask[0, :40] = True  # tissue on the edge: the edge must not erode
    for r in (0.6, 1.0, 1.5, 2.0, 2.5, 3.7, 5.0, 6.0, 10.0, 13.7, 16.0, 24.5, 32.0):
        disc = tissue._disc(r)
        assert np.array_equal(tissue._dilate(mask, r), ndimage.binary_dilation(mask, disc))
        assert np.array_equal(tissue._erode(mask, r),
                              ndimage.binary_erosion(mask, disc, border_value=1))
    small = rng.random((5, 3)) > 0.6  # discs wider than the image
    for r in (1.0, 4.4, 16.0):
        assert np.array_equal(tissue._dilate_rows(small, r),
                              ndimage.binary_dilation(small, tissue._disc(r)))
    params = TissueParams(min_hole_um2=40.0, min_area_um2=30.0)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, _ = ndimage.label(holes)
    sizes = np.bincount(labels.ravel())
    filled = mask | ((sizes < 40.0) & (np.arange(len(sizes)) > 0))[labels]
    labels, _ = ndimage.label(filled)
    sizes = np.bincount(labels.ravel())
    want = ((sizes >= 30.0) & (np.arange(len(sizes)) > 0))[labels]
    assert np.array_equal(tissue.fill_and_drop(mask, 1.0, params), want)
    rgb = rng.integers(0, 256, (301, 257, 3), dtype=np.uint8)
    for where in (mask, ~mask, mask & (rng.random(mask.shape) > 0.5)):  # odd and even counts
        for n in (int(where.sum()), int(where.sum()) - 1):
            sel = where.copy()
            sel[np.nonzero(sel)[0][n:], np.nonzero(sel)[1][n:]] = False
            assert np.array_equal(tissue._median8(rgb, sel),
                                  np.median(rgb[sel].astype(np.float32), axis=0))
    for k in (2, 3, 8):
        pad = np.pad(rgb, ((0, -301 % k), (0, -257 % k), (0, 0)), mode="edge")
        blocks = pad.reshape(pad.shape[0] // k, k, pad.shape[1] // k, k, 3)
        assert np.array_equal(tissue.block_mean(rgb, k),
                              blocks.sum(axis=(1, 3), dtype=np.float32) / np.float32(k * k))
    # the mask upsampled from the coarse field is linear interpolation thresholded at
    # 0.5, pixel for pixel, though it interpolates only where the level passes (an
    # outline), or everywhere (noise)
    for k, noise in itertools.product((2, 3, 5, 16), (False, True)):
        coarse = ndimage.gaussian_filter(rng.random((-(-301 // k), -(-257 // k))), 2.0 / k)
        field = ndimage.gaussian_filter((coarse > np.median(coarse)).astype(np.float32), 1.5)
        if noise:
            field = rng.random(field.shape).astype(np.float32)
        field[:4, :4] = 0.5  # exactly on the level
        ys, xs = ((np.arange(n, dtype=np.float64) + 0.5) / k - 0.5 for n in (301, 257))
        y0, x0 = (np.clip(np.floor(v).astype(int), 0, m - 1)
                  for v, m in ((ys, field.shape[0]), (xs, field.shape[1])))
        y1, x1 = np.minimum(y0 + 1, field.shape[0] - 1), np.minimum(x0 + 1, field.shape[1] - 1)
        fy, fx = np.clip(ys - y0, 0, 1)[:, None], np.clip(xs - x0, 0, 1)[None, :]
        along = field[:, x0] * (1 - fx) + field[:, x1] * fx
        want = along[y0] * (1 - fy) + along[y1] * fy >= 0.5
        assert 0.2 < want.mean() < 0.8
        assert np.array_equal(tissue._upsample(field, k, (301, 257)), want)
