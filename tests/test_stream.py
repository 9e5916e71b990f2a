"""The tile stream equals naive read_region and is bounded."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import REAL_SLIDES

from wsi_assist.chunks import TiffUnits, ZarrUnits, open_units
from wsi_assist.errors import SlideError
from wsi_assist.pieces import plan_pieces, scatter
from wsi_assist.settings import TilingParams
from wsi_assist.slide import describe, open_slide
from wsi_assist.stream import (
    BufferPool,
    TileBatch,
    l0_location,
    read_tile,
    stream,
    stream_naive,
)
from wsi_assist.synthetic import SyntheticSlide, write_slide
from wsi_assist.tiling import TileGrid, grid


def full_grid(path: Path, **kw: object) -> TileGrid:
    """Every tile of the slide (a box over the whole slide as the tissue)."""
    info = describe(path)
    params = TilingParams(**{"min_tissue": 0.0, **kw})  # type: ignore[arg-type]
    return grid(info, shapely.box(0, 0, info.width, info.height), params)


def collect(batches: object) -> tuple[np.ndarray, np.ndarray]:
    bs = list(batches)  # type: ignore[call-overload]
    return np.concatenate([b.index for b in bs]), np.concatenate([b.tiles for b in bs])


def compare(path: Path, g: TileGrid, exact: bool, **kw: object) -> np.ndarray:
    idx, tiles = collect(stream(path, g, **kw))  # type: ignore[arg-type]
    nidx, naive = collect(stream_naive(path, g))
    np.testing.assert_array_equal(idx, np.arange(len(g)))
    np.testing.assert_array_equal(idx, nidx)
    assert tiles.shape == (len(g), g.tile_px, g.tile_px, 3) and tiles.dtype == np.uint8
    diff = np.abs(tiles.astype(np.int16) - naive)
    if exact:
        assert diff.max() == 0
    else:
        assert diff.mean() < 0.5 and diff.max() <= 2
    return tiles


def test_svs_exact_with_edges_padded_white(svs_slide: Path) -> None:
    g = full_grid(svs_slide)
    assert not g.resized
    tiles = compare(svs_slide, g, exact=True, batch_size=5, prefetch=2, threads=2)
    # 2048 x 1536 at 224 px: the last column holds 2048 - 9 * 224 = 32 slide px
    lw, lh = g.level_dimensions
    last_col = np.flatnonzero(g.level_coords()[:, 0] + g.read_px > lw)
    assert len(last_col) > 0
    valid = lw - int(g.level_coords()[last_col[0], 0])
    assert (tiles[last_col][:, :, valid:] == 255).all()
    assert (tiles[last_col][:, :, :valid] != 255).any()
    bottom = np.flatnonzero(g.level_coords()[:, 1] + g.read_px > lh)
    valid_h = lh - int(g.level_coords()[bottom[0], 1])
    assert (tiles[bottom][:, valid_h:] == 255).all()


def test_resized_tiff_slide_matches_within_tolerance(tiff_slide: Path) -> None:
    g = full_grid(tiff_slide, target_mpp=0.6)
    assert g.resized and g.read_px != g.tile_px
    compare(tiff_slide, g, exact=False, batch_size=7)


@pytest.fixture(scope="module")
def odd_pyramid(syn_dir: Path, syn_spec: SyntheticSlide) -> Path:
    """OME pyramid with a level of downsample ~2.4 (conftest's odd_slide, written as a
    generic TIFF, opens in tiffslide with one level only)."""
    return write_slide(syn_dir / "odd.ome.tif", syn_spec, kind="ome", mpp=0.25,
                       level_sizes=[(853, 640)])


def test_odd_downsample_level(odd_pyramid: Path) -> None:
    odd_slide = odd_pyramid
    info = describe(odd_slide)
    ds = info.level_downsamples[1]
    assert abs(ds - round(ds)) > 0.1  # really non-integer
    g = full_grid(odd_slide, target_mpp=0.25 * ds, tile_px=96)
    assert g.level == 1 and not g.resized
    compare(odd_slide, g, exact=True, batch_size=16)
    g2 = full_grid(odd_slide, target_mpp=0.8, tile_px=64)
    assert g2.level == 1 and g2.resized
    compare(odd_slide, g2, exact=False, batch_size=16)


def test_tissue_subset_keeps_grid_order(svs_slide: Path) -> None:
    info = describe(svs_slide)
    blob = shapely.Point(1000, 700).buffer(500)
    g = grid(info, blob, TilingParams(min_tissue=0.1))
    assert 0 < len(g) < len(full_grid(svs_slide))
    for b, nb in zip(stream(svs_slide, g, batch_size=4), stream_naive(svs_slide, g, 4),
                     strict=True):
        np.testing.assert_array_equal(b.index, nb.index)
        np.testing.assert_array_equal(b.tiles, nb.tiles)


def test_zarr_engine_equals_tifffile_engine(svs_slide: Path) -> None:
    g = full_grid(svs_slide)
    _, a = collect(stream(svs_slide, g, engine="zarr"))
    _, b = collect(stream(svs_slide, g, engine="tifffile"))
    np.testing.assert_array_equal(a, b)
    with open_slide(svs_slide) as s:
        assert isinstance(open_units(s, 0, svs_slide, "auto"), TiffUnits)
        assert isinstance(open_units(s, 0, svs_slide, "zarr"), ZarrUnits)
        with pytest.raises(ValueError, match="engine"):
            open_units(s, 0, svs_slide, "gdal")  # type: ignore[arg-type]


@pytest.mark.parametrize("unit", [(240, 240), (64, 1000)])
def test_pieces_fill_every_tile_pixel_exactly_once(unit: tuple[int, int]) -> None:
    """Scattering each unit of a level once gives every tile its crop, white off the
    slide; units come in the order the grid first needs them."""
    rng = np.random.default_rng(0)
    h, w, r = 800, 1000, 224
    level = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    xs, ys = np.meshgrid(np.arange(-100, 1000, 200), np.arange(-50, 800, 200))  # overlap
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    xy = np.r_[xy, [[2000, 2000]]]  # wholly off the slide
    p = plan_pieces(xy, r, (h, w), unit)
    assert len({tuple(k) for k in p.units.tolist()}) == len(p)  # each unit once
    assert (np.diff(p.first) >= 0).all()
    bs = 7
    out = {b: np.zeros((len(xy[b * bs:(b + 1) * bs]), r, r, 3), np.uint8)
           for b in range(-(-len(xy) // bs))}
    count = np.zeros((len(xy), r, r), np.int64)
    for b, arr in out.items():
        arr[p.partial[b * bs:(b + 1) * bs]] = 255
    for k, (uy, ux) in enumerate(p.units.tolist()):
        rows = p.rows[p.start[k]:p.start[k + 1]].tolist()
        assert min(row[0] for row in rows) == p.first[k] and max(
            row[0] for row in rows) == p.last[k]
        scatter(level[uy * unit[0]:(uy + 1) * unit[0], ux * unit[1]:(ux + 1) * unit[1]],
                rows, out, bs)
        for j, sy0, sy1, sx0, sx1, dy0, dx0 in rows:
            count[j, dy0:dy0 + sy1 - sy0, dx0:dx0 + sx1 - sx0] += 1
    tiles = np.concatenate(list(out.values()))
    padded = np.full((h + 2 * r, w + 2 * r, 3), 255, np.uint8)
    padded[r:r + h, r:r + w] = level
    for j, (x, y) in enumerate(xy.tolist()):
        inside = np.zeros((r, r), bool)
        if x < w + r and y < h + r:
            expect = padded[y + r:y + 2 * r, x + r:x + 2 * r]
            sub = np.zeros((h + 2 * r, w + 2 * r), bool)
            sub[r:r + h, r:r + w] = True
            inside = sub[y + r:y + 2 * r, x + r:x + 2 * r]
        else:
            expect = np.full((r, r, 3), 255, np.uint8)
        np.testing.assert_array_equal(tiles[j], expect)
        np.testing.assert_array_equal(count[j], inside.astype(np.int64))
        assert p.partial[j] == (not inside.all())


def test_batches_and_arguments(svs_slide: Path) -> None:
    g = full_grid(svs_slide)
    sizes = [len(b) for b in stream(svs_slide, g, batch_size=10)]
    assert sum(sizes) == len(g) and set(sizes[:-1]) == {10}
    with pytest.raises(ValueError, match="batch_size"):
        next(stream(svs_slide, g, batch_size=0))
    empty = TileGrid(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 0, 1.0, 224, 224,
                     224, 0.5, 0.5, 0.5)
    assert list(stream(svs_slide, empty)) == []
    with pytest.raises(ValueError, match="index"):
        TileBatch(np.arange(2), np.zeros((3, 4, 4, 3), np.uint8))


def test_l0_location_inverts_tiffslide_rounding() -> None:
    for ds in (1.0, 2.0, 2.4009, 3.999, 4.0000001):
        for v in (0, 1, 7, 213, 1000):
            x, y = l0_location((v, v + 1), ds)
            assert int(x / ds) == v and int(y / ds) == v + 1


@pytest.mark.real_slides
@pytest.mark.parametrize("name", REAL_SLIDES)
def test_real_slides_exact(shared_slides: Path, name: str) -> None:
    path = shared_slides / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiffslide: NDPI metadata partial
        g = full_grid(path)
        compare(path, g, exact=not g.resized, batch_size=32)
        if g.level == 0:
            return
        # NDPI: level-0 'tiles' are 8-row strips as wide as the image; read them too
        g0 = full_grid(path, target_mpp=describe(path).level_mpp(0), tile_px=256)
        assert g0.level == 0
        p = plan_pieces(g0.level_coords(), g0.read_px, g0.level_dimensions[::-1],
                        (256, g0.level_dimensions[0]))
        assert len(p) == -(-g0.level_dimensions[1] // 256)  # one unit per 256 rows
        compare(path, g0, exact=True, batch_size=64)


@pytest.mark.real_slides
@pytest.mark.parametrize("engine", ["tifffile", "zarr"])
def test_corrupt_slide_raises_slide_error_naming_it(shared_slides: Path, engine: str) -> None:
    path = shared_slides / "bad" / "unreadable.svs"
    g = TileGrid(np.zeros((1, 2), np.int64), np.ones(1, np.float32), 0, 1.0, 16, 16, 16,
                 0.5, 0.5, 0.5)
    with pytest.raises(SlideError, match="unreadable.svs level 0: cannot decode"):
        list(stream(path, g, engine=engine))  # type: ignore[arg-type]


def test_read_tile_reference_pads_white(svs_slide: Path) -> None:
    g = full_grid(svs_slide)
    i = len(g) - 1  # bottom-right corner tile
    with open_slide(svs_slide) as s:
        t = read_tile(s, g, i, s.level_dimensions[0])
    lx, ly = g.level_coords()[i]
    assert (t[g.level_dimensions[1] - ly:] == 255).all()
    assert (t[:, g.level_dimensions[0] - lx:] == 255).all()


def test_reused_buffers_never_overwrite_batches_still_held(svs_slide: Path) -> None:
    g = full_grid(svs_slide)
    _, naive = collect(stream_naive(svs_slide, g))
    held, copies = [], []
    for k, b in enumerate(stream(svs_slide, g, batch_size=4, prefetch=2, threads=2)):
        copies.append(b.tiles.copy())
        if k % 2 == 0:
            held.append(b.tiles[1:])  # a view keeps its buffer out of the pool
    np.testing.assert_array_equal(np.concatenate(copies), naive)
    np.testing.assert_array_equal(np.concatenate(held), np.concatenate(
        [c[1:] for c in copies[::2]]))
    # the pool hands a buffer out again only once nothing else refers to it
    pool = BufferPool(4)
    a = pool.take((2, 3))
    assert pool.take((2, 3)) is not a  # still held
    a_id = id(a)
    del a
    assert id(pool.take((2, 3))) == a_id


def inside_tiles(g: TileGrid) -> np.ndarray:
    """Tiles wholly on the slide (not touching its right or bottom edge)."""
    lw, lh = g.level_dimensions
    xy = g.level_coords()
    return (xy[:, 0] + g.read_px <= lw) & (xy[:, 1] + g.read_px <= lh)


#: DCT-scaled decoding against the area (box) average of the full decode, in grey levels
#: (0-255): tiles on the slide. A slide whose size is not a multiple of the factor loses
#: its last partial row/column of output pixels (white instead of a blend with white).
DCT_MEAN, DCT_MAX = 1.0, 48


def compare_scaled(path: Path, g: TileGrid, factor: int) -> None:
    from wsi_assist.chunks import SOURCES, ScaledUnits
    from wsi_assist.stream import reduced_source

    with SOURCES.lease(str(path), g.level, "auto") as src:
        reduced, _, px = reduced_source(src, g)
        assert isinstance(reduced, ScaledUnits) and reduced.factor == factor
        assert px == g.tile_px
    idx, tiles = collect(stream(path, g, batch_size=6, threads=2))
    _, naive = collect(stream_naive(path, g))
    np.testing.assert_array_equal(idx, np.arange(len(g)))
    diff = np.abs(tiles.astype(np.int16) - naive)[inside_tiles(g)]
    assert diff.size and diff.mean() < DCT_MEAN and diff.max() <= DCT_MAX, \
        (diff.mean(), diff.max())
    # and a real difference from the exact path: the DCT decode is in use
    assert diff.max() > 0


def test_power_of_two_resize_decodes_at_reduced_scale(svs_slide: Path) -> None:
    g = full_grid(svs_slide, target_mpp=1.0, tile_px=96)  # level 0 (level 1 is / 4)
    assert g.level == 0 and g.read_px == 2 * g.tile_px
    compare_scaled(svs_slide, g, 2)


def _aperio_rgb_jpeg(tile: np.ndarray) -> bytes:
    """``tile`` as Aperio writes the JPEG tiles of RGB pages: RGB components (no colour
    transform) with ids 0, 1, 2 and neither a JFIF nor an Adobe marker, so that a
    decoder going by the JPEG alone reads YCbCr (as CMU-1-Small-Region.svs is)."""
    import imagecodecs

    data = imagecodecs.jpeg8_encode(tile, level=90, colorspace="RGB", outcolorspace="RGB")
    out, pos = bytearray(data[:2]), 2
    while True:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        seg = bytearray(data[pos:pos + 2 + length])
        if marker == 0xC0:  # SOF0: component count at 9, then (id, sampling, table)
            for k in range(seg[9]):
                seg[10 + 3 * k] = k
        elif marker == 0xDA:  # SOS: component count at 4, then (id, tables)
            for k in range(seg[4]):
                seg[5 + 2 * k] = k
        if marker not in (0xE0, 0xEE):  # JFIF, Adobe
            out += seg
        pos += 2 + length
        if marker == 0xDA:
            return bytes(out + data[pos:])


def test_markerless_rgb_jpeg_tiles_decode_at_reduced_scale_in_their_colours(
        tmp_path: Path, syn_spec: SyntheticSlide) -> None:
    """Aperio's RGB JPEG tiles name no colour space: the DCT-scaled path tells libjpeg
    "RGB" as tifffile does for the full decode (read as YCbCr, colours are off by about
    50 grey levels on average)."""
    import tifffile

    from wsi_assist.chunks import SOURCES

    w, h, t = 1024, 768, 256
    segments = [_aperio_rgb_jpeg(syn_spec.render(x, y, t, t, 1.0))
                for y in range(0, h, t) for x in range(0, w, t)]
    path = tmp_path / "rgb.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(iter(segments), shape=(h, w, 3), dtype=np.uint8, tile=(t, t),
                 compression="jpeg", photometric="rgb", metadata=None,
                 description=f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] "
                             f"({t}x{t}) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5")
    with tifffile.TiffFile(path, mode="r+b") as tf:  # tifffile writes JPEG as YCbCr
        tf.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    with SOURCES.lease(str(path), 0, "auto") as src:
        assert isinstance(src, TiffUnits) and src._jpeg == (2, 2)  # RGB, no JFIF
    compare_scaled(path, full_grid(path, target_mpp=1.0, tile_px=96), 2)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_real_slide_reduced_scale_within_tolerance(shared_slides: Path, factor: int
                                                   ) -> None:
    path = shared_slides / "CMU-1-Small-Region.svs"
    mpp = describe(path).require_mpp()
    g = full_grid(path, target_mpp=mpp * factor, tile_px=224 if factor < 8 else 64)
    compare_scaled(path, g, factor)


def test_unaligned_power_of_two_grid_keeps_exact_area_resize(svs_slide: Path) -> None:
    import dataclasses

    from wsi_assist.chunks import SOURCES
    from wsi_assist.stream import reduced_source

    g = full_grid(svs_slide, target_mpp=1.0, tile_px=96)
    shifted = dataclasses.replace(g, coords=g.coords + 1)  # odd corners: no 1/2 scale
    with SOURCES.lease(str(svs_slide), g.level, "auto") as src:
        assert reduced_source(src, shifted)[0] is src
    compare(svs_slide, shifted, exact=True, batch_size=5)


def test_ndpi_power_of_two_falls_back_to_full_decode(shared_slides: Path) -> None:
    from wsi_assist.chunks import SOURCES
    from wsi_assist.stream import reduced_source

    path = shared_slides / "test3-DAPI-2-387.ndpi"
    g = full_grid(path, target_mpp=describe(path).require_mpp() * 2, tile_px=128)
    with SOURCES.lease(str(path), g.level, "auto") as src:
        assert reduced_source(src, g)[0] is src  # JPEG strips with a shared header


def test_near_power_of_two_target_reads_an_exact_multiple() -> None:
    """A 40x scan at 0.2527 um/px read at 0.5: 2 x tile_px exactly (0.5054 delivered),
    so the DCT-scaled decode applies; a target 10 % off keeps its own ratio."""
    from wsi_assist.slide import SlideInfo

    info = SlideInfo(path="x.svs", format="aperio", vendor="aperio", width=4000,
                     height=3000, level_count=2, level_dimensions=((4000, 3000), (1000, 750)),
                     level_downsamples=(1.0, 4.0), mpp=0.2527, mpp_source="metadata",
                     objective_power=40.0)
    g = grid(info, shapely.box(0, 0, 4000, 3000), TilingParams(target_mpp=0.5))
    assert (g.level, g.read_px, g.tile_px) == (0, 448, 224)
    assert g.delivered_mpp == pytest.approx(0.5054)
    g = grid(info, shapely.box(0, 0, 4000, 3000), TilingParams(target_mpp=0.56))
    assert g.read_px == round(224 * 0.56 / 0.2527)


def test_scaled_decode_of_cut_short_or_bad_chunks(svs_slide: Path) -> None:
    """A chunk cut short is decoded in full and area-reduced (as the full path reads
    it); bytes that are no JPEG raise, which ``decode`` reports naming the slide."""
    from wsi_assist.chunks import SOURCES, TiffUnits

    with SOURCES.lease(str(svs_slide), 0, "tifffile") as src:
        assert isinstance(src, TiffUnits)
        scaled = src.scaled(2)
        assert scaled is not None and src.scaled(3) is None
        data = src.read_chunk(5)
        assert data is not None
        ch, cw = src.unit_shape
        assert scaled.chunk_shape == (ch // 2, cw // 2)
        out = np.zeros((ch // 2, cw // 2, 3), np.uint8)
        scaled.decode_chunk(data[:len(data) // 2], out)
        full = np.empty((ch, cw, 3), np.uint8)
        src.decode_chunk(data[:len(data) // 2], 5, full)
        box = full.reshape(ch // 2, 2, cw // 2, 2, 3).mean(axis=(1, 3))
        assert np.abs(out - box).max() <= 0.5 + 1e-9  # Pillow rounds halves up
        whole = np.zeros_like(out)  # the intact chunk: DCT-scaled, close to the box
        scaled.decode_chunk(data, whole)
        src.decode_chunk(data, 5, full)
        box = full.reshape(ch // 2, 2, cw // 2, 2, 3).mean(axis=(1, 3))
        assert 0 < np.abs(whole - box).max() <= DCT_MAX
        with pytest.raises(RuntimeError, match="Not a JPEG"):
            scaled.decode_chunk(b"not a jpeg" + data, out)
