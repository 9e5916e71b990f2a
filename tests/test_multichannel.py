"""Multichannel (fluorescence, CYX) slides: OME-TIFF and QPTIFF read through the
stream exactly, channel names in ``info``, tissue from the nuclear channel, pseudo-colour
pictures, and RGB-only stages recorded as not run with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from stage_helper import run_slide
from typer.testing import CliRunner

from wsi_assist import channels, config, qc
from wsi_assist.chunks import TiffUnits, ZarrUnits, open_units
from wsi_assist.cli import app
from wsi_assist.lowres import level_and_factor, read_lowres
from wsi_assist.settings import TilingParams
from wsi_assist.slide import describe, open_slide
from wsi_assist.stages import REGISTRY, fingerprints, not_rgb_reason
from wsi_assist.store import SlideStore
from wsi_assist.stream import TileBatch, stream, stream_naive
from wsi_assist.synthetic import default_slide, write_slide
from wsi_assist.tiling import grid

runner = CliRunner()
W, H, MPP = 1536, 1024, 0.5
#: Where nuclei are (level-0 x0, y0, x1, y1), and a bright non-nuclear blob elsewhere.
NUCLEI = (128, 160, 704, 864)
BLOB = (1024, 192, 1408, 800)


def planes(names: list[str], dtype: type, nuclear: int, seed: int = 0) -> np.ndarray:
    """(C, H, W): dim noise everywhere; round nuclei in ``NUCLEI`` on channel
    ``nuclear``; a bright blob in ``BLOB`` on another channel (which tissue detection
    must ignore); sparse cells in the bottom of the nuclei region on the rest."""
    rng = np.random.default_rng(seed)
    top = 60000 if dtype == np.uint16 else 230
    floor = 400 if dtype == np.uint16 else 4
    noise = rng.standard_normal((len(names), H, W), dtype=np.float32)
    out = (noise * np.float32(floor / 4) + np.float32(floor)).clip(0, top)
    yy, xx = np.mgrid[0:H, 0:W]
    x0, y0, x1, y1 = NUCLEI
    for cy in range(y0 + 10, y1 - 10, 18):
        for cx in range(x0 + 10, x1 - 10, 18):
            jy, jx = rng.integers(-3, 4, 2)
            r = (xx[cy - 9:cy + 9, cx - 9:cx + 9] - cx - jx) ** 2 + \
                (yy[cy - 9:cy + 9, cx - 9:cx + 9] - cy - jy) ** 2
            out[nuclear, cy - 9:cy + 9, cx - 9:cx + 9][r < 36] = top * 0.8
    other = (nuclear + 1) % len(names)
    bx0, by0, bx1, by1 = BLOB
    out[other, by0:by1, bx0:bx1] = top * 0.9
    for c in range(len(names)):
        if c not in (nuclear, other):
            out[c, 720:y1:12, x0:x1:12] = top * 0.7
    return out.astype(dtype)


def write_ome(path: Path, data: np.ndarray, names: list[str], tile: int = 256,
              colors: list[int] | None = None) -> Path:
    """An OME-TIFF pyramid (2 levels, sub-IFDs), one page per channel, CYX."""
    meta: dict[str, Any] = {"axes": "CYX", "Channel": {"Name": names},
                            "PhysicalSizeX": MPP, "PhysicalSizeY": MPP}
    if colors is not None:
        meta["Channel"]["Color"] = colors
    opts = {"tile": (tile, tile), "compression": "zlib", "photometric": "minisblack"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data, subifds=1, metadata=meta, **opts)
        tw.write(data[:, ::2, ::2], subfiletype=1, **opts)
    return path


def qpi_xml(kind: str, name: str | None = None, marker: str | None = None,
            color: str | None = None) -> str:
    """A PerkinElmer (Vectra) per-page description, as QPTIFF pages carry."""
    fields = f"<Name>{name}</Name>" if name else ""
    fields += f"<Color>{color}</Color>" if color else ""
    fields += "<Responsivity><Filter><Name>Filter 1</Name></Filter></Responsivity>"
    fields += f"<Biomarker>{marker}</Biomarker>" if marker else ""
    return ('<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription>'
            "<DescriptionVersion>2</DescriptionVersion><AcquisitionSoftware>"
            f"PerkinElmer-QPI</AcquisitionSoftware><ImageType>{kind}</ImageType>{fields}"
            "</PerkinElmer-QPI-ImageDescription>")


def write_qptiff(path: Path, data: np.ndarray, names: list[str], markers: list[str | None],
                 colors: list[str]) -> Path:
    """A QPTIFF-like file: one full-resolution page per channel (PerkinElmer XML with
    the channel's name), an RGB thumbnail, one half-resolution page per channel."""
    res = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}
    page = {"software": "PerkinElmer-QPI", "metadata": None, "photometric": "minisblack",
            "tile": (256, 256), "compression": "zlib", **res}
    with tifffile.TiffWriter(path) as tw:
        for c, (name, marker, color) in enumerate(zip(names, markers, colors, strict=True)):
            tw.write(data[c], description=qpi_xml("FullResolution", name, marker, color),
                     **page)
        thumb = np.zeros((64, 96, 3), np.uint8)
        tw.write(thumb, description=qpi_xml("Thumbnail"), software="PerkinElmer-QPI",
                 metadata=None, photometric="rgb")
        for c in range(len(names)):
            tw.write(data[c, ::2, ::2], description=qpi_xml("ReducedResolution"),
                     subfiletype=1, **page)
    return path


def write_planar(path: Path, data: np.ndarray) -> Path:
    """One planar-separate page holding every channel, in strips (no names)."""
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate",
                     rowsperstrip=40, compression="zlib", metadata={"axes": "CYX"},
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def mc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multichannel")


#: name -> (writer, channel names as info lists them, dtype, nuclear channel index)
CASES: dict[str, tuple[str, list[str], type, int]] = {
    "ome3-uint8": ("ome", ["CD8", "DAPI", "PanCK"], np.uint8, 1),
    "ome5-uint16": ("ome", ["DAPI", "CD3", "CD20", "Ki67", "PanCK"], np.uint16, 0),
    "qptiff5-uint8": ("qptiff", ["DAPI", "CD8 (Opal 520)", "PD-L1 (Opal 570)",
                                 "FoxP3 (Opal 620)", "Opal 690"], np.uint8, 0),
    "planar3-uint16": ("planar", ["Channel 1", "Channel 2", "Channel 3"], np.uint16, 0),
    "ome1-uint16": ("ome", ["DAPI"], np.uint16, 0),  # one plane: a YX series
}


@pytest.fixture(scope="module")
def slides(mc_dir: Path) -> dict[str, Path]:
    out = {}
    for name, (kind, names, dtype, nuc) in CASES.items():
        data = planes(names, dtype, nuc, seed=len(out))
        if kind == "ome":
            out[name] = write_ome(mc_dir / f"{name}.ome.tif", data, names)
        elif kind == "qptiff":
            fluors = ["DAPI", "Opal 520", "Opal 570", "Opal 620", "Opal 690"]
            markers: list[str | None] = ["DAPI", "CD8", "PD-L1", "FoxP3", None]
            colors = ["0,0,255", "0,255,0", "255,255,0", "255,0,0", "255,255,255"]
            out[name] = write_qptiff(mc_dir / f"{name}.qptiff", data, fluors, markers,
                                     colors)
        else:
            out[name] = write_planar(mc_dir / f"{name}.tif", data)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_describe_names_layout_and_dtype(slides: dict[str, Path], case: str) -> None:
    kind, names, dtype, _ = CASES[case]
    info = describe(slides[case])
    assert (info.layout, info.channels, info.dtype) == ("channels", tuple(names),
                                                        np.dtype(dtype).name)
    assert info.multichannel and (info.mpp, info.width, info.height) == (MPP, W, H)
    assert info.format == {"ome": "ome-tiff", "qptiff": "qptiff"}.get(kind, "generic-tiff")
    if kind != "planar":
        assert info.level_dimensions == ((W, H), (W // 2, H // 2))
    if kind == "qptiff":  # <Color> read, white meaning none
        assert info.channel_colors[:2] == ((0, 0, 255), (0, 255, 0))
        assert info.channel_colors[4] is None


def test_info_lists_channels(slides: dict[str, Path]) -> None:
    paths = [str(slides[c]) for c in ("ome3-uint8", "qptiff5-uint8")]
    r = runner.invoke(app, ["info", *paths, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["channels"] for row in rows] == [CASES["ome3-uint8"][1],
                                                 CASES["qptiff5-uint8"][1]]
    assert {row["layout"] for row in rows} == {"channels"}
    r = runner.invoke(app, ["info", *paths], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "3 x uint8: CD8, DAPI, PanCK" in r.stdout
    letters = "".join(ch for ch in r.stdout if ch.isalnum())  # cells may wrap
    assert "5xuint8DAPICD8Opal520PDL1Opal570FoxP3Opal620Opal690" in letters


def test_info_of_an_rgb_slide_says_rgb(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "a.svs", default_slide(512, 384), kind="svs")
    row = json.loads(runner.invoke(app, ["info", str(p), "--json"]).stdout)[0]
    assert (row["layout"], row["dtype"], row["channels"]) == ("rgb", "uint8",
                                                              ["Red", "Green", "Blue"])


def _grid(path: Path, **kw: Any) -> Any:
    info = describe(path)
    return grid(info, shapely.box(0, 0, info.width, info.height),
                TilingParams(min_tissue=0.0, **kw))


def _collect(batches: Any) -> tuple[np.ndarray, np.ndarray, set[str]]:
    bs = list(batches)
    return (np.concatenate([b.index for b in bs]), np.concatenate([b.tiles for b in bs]),
            {b.layout for b in bs})


@pytest.mark.parametrize("case", list(CASES))
def test_stream_equals_direct_reads(slides: dict[str, Path], case: str) -> None:
    """Every tile (edges padded 0) equals tiffslide's read_region and tifffile's own
    read of the level, with both engines, and the tifffile engine is the one used."""
    path = slides[case]
    _, names, dtype, _ = CASES[case]
    g = _grid(path, tile_px=200)
    _, tiles, layouts = _collect(stream(path, g, batch_size=5, threads=2))
    assert layouts == {"channels"} and tiles.dtype == dtype
    assert tiles.shape == (len(g), 200, 200, len(names))
    _, naive, _ = _collect(stream_naive(path, g))
    np.testing.assert_array_equal(tiles, naive)
    _, via_zarr, _ = _collect(stream(path, g, engine="zarr", batch_size=7))
    np.testing.assert_array_equal(tiles, via_zarr)
    level = tifffile.imread(path, series=0, level=0)  # (C, H, W)
    padded = np.zeros((len(names), H + 200, W + 200), dtype)
    padded[:, :H, :W] = level
    for j, (x, y) in enumerate(g.level_coords().tolist()):
        np.testing.assert_array_equal(tiles[j], padded[:, y:y + 200, x:x + 200]
                                      .transpose(1, 2, 0))
    with open_slide(path) as s:
        assert isinstance(open_units(s, 0, path, "auto"), TiffUnits)
        assert isinstance(open_units(s, 0, path, "zarr"), ZarrUnits)


@pytest.mark.parametrize("case", list(CASES))
def test_overview_is_the_rounded_block_mean_of_each_plane(slides: dict[str, Path],
                                                         case: str) -> None:
    path = slides[case]
    _, names, dtype, _ = CASES[case]
    info = describe(path)
    level, f = level_and_factor(info, 6.0)
    assert f > 1  # a level block-averaged
    with open_slide(path) as s:
        overview, ds = read_lowres(s, info, 6 * MPP)
    assert ds == pytest.approx(info.level_downsamples[level] * f) and overview.dtype == dtype
    px = tifffile.imread(path, series=0, level=level)
    px = (px.transpose(1, 2, 0) if px.ndim == 3 else px[..., None])  # (H, W, C)
    h, w = px.shape[0] // f, px.shape[1] // f
    want = px[:h * f, :w * f].reshape(h, f, w, f, len(names)).mean(axis=(1, 3))
    np.testing.assert_array_equal(overview, want.round().astype(dtype))


@pytest.mark.parametrize("case", ["ome5-uint16", "qptiff5-uint8"])
def test_stream_from_level_1_and_resized(slides: dict[str, Path], case: str) -> None:
    path = slides[case]
    g1 = _grid(path, target_mpp=2 * MPP, tile_px=128)
    assert g1.level == 1 and not g1.resized
    _, tiles, _ = _collect(stream(path, g1, batch_size=8))
    _, naive, _ = _collect(stream_naive(path, g1))
    np.testing.assert_array_equal(tiles, naive)
    level1 = tifffile.imread(path, series=0, level=1)
    x, y = g1.level_coords()[0]
    np.testing.assert_array_equal(tiles[0], level1[:, y:y + 128, x:x + 128]
                                  .transpose(1, 2, 0))
    gr = _grid(path, target_mpp=0.7, tile_px=96)
    assert gr.resized
    _, tiles, _ = _collect(stream(path, gr, batch_size=8))
    _, naive, _ = _collect(stream_naive(path, gr))
    np.testing.assert_array_equal(tiles, naive)
    assert tiles.shape[1:] == (96, 96, 5)


def test_tile_batch_validates_channels() -> None:
    TileBatch(np.arange(2), np.zeros((2, 4, 4, 7), np.uint16), layout="channels")
    with pytest.raises(ValueError, match="multichannel tiles"):
        TileBatch(np.arange(2), np.zeros((2, 4, 4), np.uint16), layout="channels")
    with pytest.raises(ValueError, match="multichannel tiles"):
        TileBatch(np.arange(2), np.zeros((2, 4, 4, 2), np.int64), layout="channels")
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        TileBatch(np.arange(2), np.zeros((2, 4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="layout"):
        TileBatch(np.arange(2), np.zeros((2, 4, 4, 3), np.uint8), layout="cmyk")  # type: ignore[arg-type]


def _cfg(**sections: dict[str, Any]) -> Any:
    return config.override(config.load(), report={"pdf": False}, **sections)


def _inside(geom: Any, box: tuple[int, int, int, int]) -> float:
    """Fraction of ``geom``'s area inside ``box``."""
    return float(geom.intersection(shapely.box(*box)).area / max(geom.area, 1e-9))


@pytest.mark.parametrize("case", ["ome3-uint8", "ome5-uint16", "qptiff5-uint8"])
def test_run_finds_tissue_from_the_nuclear_channel(slides: dict[str, Path], case: str,
                                                   tmp_path: Path) -> None:
    """tissue, tiles, report: tissue is where the nuclei are (the bright blob in another
    channel is not tissue), the thumbnail and overview are pseudo-colour, the QC focus
    is the nuclear channel's, and RGB-only stages are not run, with the reason."""
    _, names, _, nuc = CASES[case]
    out = tmp_path / "out"
    cfg = _cfg()
    _, summary = run_slide(slides[case], out / case, cfg, ("tissue", "tiles", "report"))
    assert summary["tissue"]["nuclear_channel"] == names[nuc]
    store = SlideStore(out / case, "r")
    tissue = store.read_tissue()
    assert tissue.background == "dark"
    nuclei_area = (NUCLEI[2] - NUCLEI[0]) * (NUCLEI[3] - NUCLEI[1])
    assert _inside(tissue.geometry, NUCLEI) > 0.97
    assert 0.8 < tissue.geometry.area / nuclei_area < 1.2
    assert tissue.geometry.intersection(shapely.box(*BLOB)).area == 0
    # pseudo-colour: nuclei blue, the blob in the next channel's colour, background dark
    overview = store.read_overview()
    assert overview is not None and overview.image.shape[2] == 3
    colors = channels.display_colors(names, describe(slides[case]).channel_colors)
    thumb = np.asarray(Image.open(out / case / "thumbnail.png").convert("RGB"))
    f = thumb.shape[1] / W
    for img in (overview.image, thumb):
        s = img.shape[1] / W
        nuclei = img[int(300 * s):int(600 * s), int(300 * s):int(500 * s)].mean(axis=(0, 1))
        blob = img[int(400 * s):int(600 * s), int(1100 * s):int(1300 * s)].mean(axis=(0, 1))
        assert nuclei[2] > max(1.3 * nuclei[0], 1.3 * nuclei[1], 50)  # blue dominates
        assert np.argmax(blob) == np.argmax(colors[(nuc + 1) % len(names)])
    assert thumb[int(950 * f):, int(900 * f):int(1000 * f)].mean() < 40  # dark glass
    # QC on the nuclear channel: sharp nuclei (0-255 once scaled), little dark glass
    g = store.read_grid()
    q = store.read_qc()
    assert q is not None and len(q["focus"]) == len(g)
    inside = np.array([shapely.box(x, y, x + g.size_l0, y + g.size_l0).within(
        shapely.box(*NUCLEI)) for x, y in g.coords])
    assert inside.any()
    assert np.median(q["focus"][inside]) > 5000
    assert np.median(q["background"][inside]) < 0.8  # nuclei cover a third of it
    assert names[nuc] in str(store.group[qc_key()].attrs["description"])
    report = json.loads((out / case / "report.json").read_text())
    # the built-in nuclei do run on fluorescence (tests/test_nuclei_fluorescence.py)
    assert report["stages"]["submodels"]["status"] == "not run"
    for name in ("embed", "zeroshot", "caption"):
        assert report["stages"][name] == {
            "status": "not run", "reason": not_rgb_reason(name, len(names)),
            "how_to_enable": not_rgb_reason(name, len(names))}
    assert report["slide"]["channels"] == names
    assert f"{len(names)} channels); embed needs RGB brightfield tiles" in \
        (out / case / "report.md").read_text()


def qc_key() -> str:
    from wsi_assist.store import TILE_QC

    return TILE_QC


def test_cli_run_records_rgb_only_stages_as_not_run(slides: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """The full default stage list on a multichannel slide: done, with embed and the
    rest not run for the fluorescence reason (not for lack of weights). A configured
    model that is missing is a usage error before any slide (tests/test_faults.py)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report:\n  pdf: false\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(slides["ome5-uint16"]), "-o", str(out),
                            "--config", str(cfg), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    folder = out / "ome5-uint16.ome"
    done = json.loads((folder / "done.json").read_text())
    assert done["summary"]["embed"] == {"skipped": not_rgb_reason("embed", 5)}
    # the built-in nuclei run on the DAPI channel (tests/test_nuclei_fluorescence.py)
    assert done["summary"]["submodels"]["nuclei"]["counts"]["Nucleus"] > 1000
    assert done["info"]["channels"] == CASES["ome5-uint16"][1]
    html = (folder / "report.html").read_text()
    assert "needs RGB brightfield tiles" in html and "CD20" in html


def test_nuclear_channel_from_settings(slides: dict[str, Path], tmp_path: Path) -> None:
    """The planar slide has no names: auto takes channel 1 (where its nuclei are); an
    index or a name picks another; an unknown name fails naming the channels."""
    path = slides["planar3-uint16"]
    _, s = run_slide(path, tmp_path / "a", _cfg(), ("tissue",))
    assert s["tissue"]["nuclear_channel"] == "Channel 1"
    assert "first channel" in s["tissue"]["nuclear_channel_from"]
    _, s = run_slide(path, tmp_path / "b", _cfg(channels={"nuclear": 1}), ("tissue",))
    assert s["tissue"]["nuclear_channel"] == "Channel 2"
    # channel 2 holds the bright blob: tissue is found there instead
    assert _inside(SlideStore(tmp_path / "b", "r").read_tissue().geometry, BLOB) > 0.9
    _, s = run_slide(path, tmp_path / "c", _cfg(channels={"nuclear": "channel 3"}),
                     ("tissue",))
    assert s["tissue"]["nuclear_channel"] == "Channel 3"
    with pytest.raises(Exception, match="no channel named 'DAPI'.*0: Channel 1"):
        run_slide(path, tmp_path / "d", _cfg(channels={"nuclear": "DAPI"}), ("tissue",))
    with pytest.raises(Exception, match="index 7 is out of range"):
        run_slide(path, tmp_path / "e", _cfg(channels={"nuclear": 7}), ("tissue",))


def test_channels_section_fingerprints_multichannel_slides_only(
        slides: dict[str, Path], tmp_path: Path) -> None:
    rgb = describe(write_slide(tmp_path / "a.svs", default_slide(512, 384), kind="svs"))
    mc = describe(slides["ome3-uint8"])
    base, changed = config.load(), config.override(config.load(),
                                                   channels={"nuclear": "CD8"})
    assert fingerprints("fp", base, rgb) == fingerprints("fp", changed, rgb)
    a, b = fingerprints("fp", base, mc), fingerprints("fp", changed, mc)
    assert [s for s in a if a[s] != b[s]] == list(REGISTRY)  # tissue and all after it
    assert [s for s, st in REGISTRY.items() if "channels" in st.sections] == [
        "tissue", "tiles", "submodels"]


def test_pseudo_color_and_scaling() -> None:
    names = ["CD3", "Hoechst 33342", "PanCK"]
    assert channels.nuclear_channel(names) == (1, "by name")
    colors = channels.display_colors(names, [None, None, (255, 0, 255)])
    assert colors == [channels.PALETTE[0], channels.NUCLEAR_COLOR, (255, 0, 255)]
    data = np.zeros((10, 10, 3), np.uint16)
    data[:5, :, 1] = 4000
    data[5:, :, 0] = 1000
    data[0, 0, 2] = 65535
    lv = channels.levels(data, (0.0, 100.0))
    rgb = channels.pseudo_color(data, colors, lv)
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 10, 3)
    assert tuple(rgb[2, 5]) == channels.NUCLEAR_COLOR
    assert tuple(rgb[7, 5]) == channels.PALETTE[0]
    assert tuple(rgb[0, 0]) == (255, 90, 255)  # additive, clipped at 255
    assert (channels.to_uint8(np.array([0, 50, 100, 200]), 50, 150) ==
            [0, 0, 128, 255]).all()
    flat = channels.levels(np.full((4, 4, 1), 7, np.uint16))
    assert flat[0, 1] > flat[0, 0]  # never divides by zero
    # a sparse marker: its noise is not stretched to full brightness
    sparse = np.random.default_rng(0).normal(100, 10, (200, 200, 1)).astype(np.uint16)
    sparse[::50, ::50] = 5000
    lo, hi = channels.levels(sparse)[0]
    assert hi > lo + 0.2 * (5000 - lo)


def test_channel_qc_scores() -> None:
    tiles = np.zeros((2, 32, 32, 2), np.uint16)
    tiles[0, ::4, ::4, 1] = 1000  # sharp dots on the nuclear channel
    tiles[1, :, :, 0] = 1000  # a flat bright other channel
    score = qc.ChannelScores(1, np.array([[0.0, 1000.0], [0.0, 1000.0]]))
    background, focus = score(tiles)
    assert background[1] == 0 and background[0] > 0.5
    assert focus[0] > 100 and focus[1] == 0


def test_submodels_not_applicable_when_every_analysis_was_skipped() -> None:
    """On a fluorescence slide the stage ran but analysed nothing: the report's stage table
    says "not applicable" and why, not "done"."""
    from wsi_assist.report.data import stage_statuses

    stages = {"tissue": {"status": "done"}, "submodels": {"status": "done"}}
    why = "needs a bright-field slide; this slide's background is fluorescence"
    out = stage_statuses(stages, [{"name": "nuclei", "skipped": why}])
    assert out["submodels"]["status"] == "not applicable"
    assert why in out["submodels"]["reason"] and out["tissue"] == {"status": "done"}
    ran = [{"name": "nuclei", "skipped": None}, {"name": "other", "skipped": why}]
    assert stage_statuses(stages, ran)["submodels"] == {"status": "done"}
    assert stage_statuses(stages, [])["submodels"] == {"status": "done"}
