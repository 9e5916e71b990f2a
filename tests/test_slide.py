"""Opening slides, the mpp cascade and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_assist.errors import SlideError
from wsi_assist.slide import describe, mpp_for, read_mpp_csv, tiff_resolution_mpp
from wsi_assist.synthetic import default_slide, write_slide


def test_svs_mpp_from_aperio_metadata(svs_slide: Path) -> None:
    info = describe(svs_slide)
    assert (info.vendor, info.mpp, info.mpp_source) == ("aperio", 0.5, "metadata")
    assert info.objective_power == 20
    assert info.level_dimensions == ((2048, 1536), (512, 384))
    assert info.synthetic


def test_generic_tiff_mpp_from_resolution_tags(tiff_slide: Path) -> None:
    info = describe(tiff_slide)
    assert info.mpp_source == "tiff-resolution"
    assert info.mpp == pytest.approx(0.25, rel=1e-4)
    assert info.vendor is None and info.format == "generic-tiff"


def test_ome_mpp_from_physical_size(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "x.ome.tif", default_slide(512, 384), kind="ome", mpp=0.3)
    info = describe(p)
    assert (info.format, info.mpp, info.mpp_source) == ("ome-tiff", 0.3, "metadata")


def test_no_mpp_needs_override(nompp_slide: Path) -> None:
    info = describe(nompp_slide)
    assert info.mpp is None and info.mpp_source is None
    with pytest.raises(SlideError, match="--mpp X or --mpp-csv FILE"):
        info.require_mpp()
    info = describe(nompp_slide, mpp_override=0.42)
    assert (info.mpp, info.mpp_source) == (0.42, "override")


def test_override_does_not_replace_real_metadata(svs_slide: Path) -> None:
    assert describe(svs_slide, mpp_override=0.9).mpp_source == "metadata"


def test_72_dpi_default_is_rejected(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "dpi.tif", default_slide(512, 384), kind="tiff-72dpi")
    info = describe(p)
    assert info.mpp is None
    assert tiff_resolution_mpp("INCH", 72) is None
    assert tiff_resolution_mpp("NONE", 40000) is None
    assert tiff_resolution_mpp("CENTIMETER", 20000) == pytest.approx(0.5)
    assert tiff_resolution_mpp("CENTIMETER", 10) is None  # 1000 um/px: implausible


def test_objective_power_is_an_estimate(tmp_path: Path) -> None:
    p = tmp_path / "obj.svs"
    tifffile.imwrite(p, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256),
                     photometric="rgb", metadata=None,
                     description="Aperio Image Library v12\r\n512x512|AppMag = 40")
    info = describe(p)
    assert (info.mpp, info.mpp_source) == (0.25, "objective-power")


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, not a slide\n" * 20, "not a readable TIFF-based slide"),
])
def test_non_slides_give_one_line_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    p = tmp_path / "x.svs"
    p.write_bytes(content)
    with pytest.raises(SlideError, match=reason) as e:
        describe(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_truncated_slide(svs_slide: Path, tmp_path: Path) -> None:
    p = tmp_path / "cut.svs"
    p.write_bytes(svs_slide.read_bytes()[:4000])
    with pytest.raises(SlideError) as e:
        describe(p)
    assert str(p) in str(e.value)


def test_grey_16_bit_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "grey16.tif"
    tifffile.imwrite(p, np.zeros((300, 300), np.uint16), tile=(256, 256),
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    # a grey plane is a fluorescence channel only in OME-TIFF and QPTIFF
    with pytest.raises(SlideError, match="unsupported pixel type uint16.*single plane "
                                         "only in OME-TIFF or QPTIFF"):
        describe(p)


def test_unsupported_format_names_the_alternative(tmp_path: Path) -> None:
    p = tmp_path / "scan.mrxs"
    p.write_bytes(b"\xff\xd8\xff\xe0")
    with pytest.raises(SlideError, match="MRXS is not supported.*OME-TIFF"):
        describe(p)


def test_mpp_csv(tmp_path: Path) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\na.tif,0.25\nb,0.5\n")
    table = read_mpp_csv(csv)
    assert mpp_for(Path("/x/a.tif"), None, table) == 0.25
    assert mpp_for(Path("/x/b.svs"), 1.0, table) == 0.5
    assert mpp_for(Path("/x/c.svs"), 1.0, table) == 1.0
    csv.write_text("slide,mpp\na.tif,fast\n")
    with pytest.raises(SlideError, match="line 2: mpp 'fast' is not a number"):
        read_mpp_csv(csv)


@pytest.mark.real_slides
def test_real_slides(shared_slides: Path) -> None:
    cmu = describe(shared_slides / "CMU-1-Small-Region.svs")
    assert (cmu.mpp, cmu.mpp_source, cmu.objective_power) == (0.499, "metadata", 20)
    ome = describe(shared_slides / "HE_example.ome.tif")
    assert ome.mpp == pytest.approx(0.5, abs=1e-3) and ome.mpp_source == "metadata"
    ndpi = describe(shared_slides / "test3-DAPI-2-387.ndpi")
    assert ndpi.vendor == "hamamatsu" and ndpi.level_count == 4
    assert ndpi.mpp == pytest.approx(0.228, abs=1e-3)


@pytest.mark.real_slides
@pytest.mark.parametrize("name, reason", [
    ("unreadable.svs", "pixel data cannot be decoded"),
    ("unopenable.tiff", "pixel data cannot be decoded"),
    ("broken.svs", "not a readable TIFF-based slide"),
    ("fuzzed.tiff", "pixel data cannot be decoded"),
    ("jpeg-named.mrxs", "MRXS is not supported"),
])
def test_bad_shared_slides(shared_slides: Path, name: str, reason: str) -> None:
    with pytest.raises(SlideError, match=reason) as e:
        describe(shared_slides / "bad" / name)
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("factor", [1, 2, 3, 16, 17])
def test_reduced_reads_are_the_rounded_means_of_the_level(shared_slides: Path, factor: int,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """``lowres.read_reduced`` (units decoded in threads, integer block means rounded
    half to even) gives numpy's rounded mean of tiffslide's pixels, from a corner off
    the chunk grid, in strips that cut through units (a 600 kB strip budget)."""
    from wsi_assist import lowres
    from wsi_assist.slide import open_slide

    monkeypatch.setattr(lowres, "STRIP_BYTES", 600_000)
    for name in ("CMU-1-Small-Region.svs", "HE_example.ome.tif", "test3-DAPI-2-387.ndpi"):
        path = shared_slides / name
        info = describe(path)
        with open_slide(path) as s:
            for level in range(info.level_count):
                w, h = info.level_dimensions[level]
                x0, y0 = 13, 7
                ow, oh = (w - x0) // factor, (h - y0) // factor
                if min(ow, oh) < 1:
                    continue
                got = lowres.read_reduced(s, info, level, (x0, y0), (ow, oh), factor,
                                          threads=2)
                px = np.asarray(s.zarr_group[str(level)][y0:y0 + oh * factor,
                                                         x0:x0 + ow * factor])[..., :3]
                want = px.reshape(oh, factor, ow, factor, 3).mean(axis=(1, 3)).round()
                np.testing.assert_array_equal(got, want.astype(np.uint8), err_msg=name)


def test_a_level_that_cannot_be_decoded_names_the_file_and_level(shared_slides: Path,
                                                                 tmp_path: Path) -> None:
    from wsi_assist.lowres import read_lowres
    from wsi_assist.slide import open_slide

    path = tmp_path / "cut.svs"
    data = (shared_slides / "CMU-1-Small-Region.svs").read_bytes()
    with tifffile.TiffFile(shared_slides / "CMU-1-Small-Region.svs") as tf:
        page = tf.pages[0]
        o, n = int(page.dataoffsets[40]), int(page.databytecounts[40])
    path.write_bytes(data[:o] + b"\x00" * n + data[o + n:])  # one tile zeroed: not a JPEG
    info = describe(path, check_pixels=False)
    with open_slide(path) as s, pytest.raises(SlideError,
                                              match=r"cut\.svs level 0: cannot decode chunk "
                                                    r"row 4, column 0: Not a JPEG"):
        read_lowres(s, info, info.require_mpp() * 2)


@pytest.mark.parametrize("f", [1, 2, 3, 4, 16, 17])
def test_block_means_round_every_sum_half_to_even(f: int) -> None:
    from wsi_assist.lowres import box_mean

    # one block for every sum 0 .. 255 f^2: that many 255s, the remainder, then zeros,
    # in a shuffled order per block; as many blocks per row as make up a level row
    n = f * f
    sums = np.arange(255 * n + 1)
    full, rest = sums // 255, sums % 255
    k = np.arange(n)
    px = np.where(k < full[:, None], 255, np.where(k == full[:, None], rest[:, None], 0))
    px = np.random.default_rng(f).permuted(px, axis=1).astype(np.uint8)
    w = 7
    rows = -(-len(sums) // w)
    px = np.concatenate([px, np.zeros((rows * w - len(sums), n), np.uint8)])
    blocks = px.reshape(rows, w, f, f).transpose(0, 2, 1, 3)[..., None]  # (H, f, W, f, 1)
    want = np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    got = box_mean(np.ascontiguousarray(blocks))
    assert got.dtype == np.uint8 and got.shape == (rows, w, 1)
    assert np.array_equal(got, want)
    assert np.array_equal(np.repeat(got, 3, axis=2),
                          box_mean(np.ascontiguousarray(np.repeat(blocks, 3, axis=4))))
