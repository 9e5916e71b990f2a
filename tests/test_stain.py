"""Optical density, colour deconvolution, kind detection and stain-vector estimation
against known answers; real slides; the stain section of a batch's report."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wsi_assist import config
from wsi_assist.errors import ConfigError
from wsi_assist.settings import StainParams
from wsi_assist.stain import (
    DAB,
    HEMATOXYLIN,
    WHITE,
    angle_deg,
    deconvolve,
    default_vectors,
    detect_kind,
    estimate_background,
    estimate_vectors,
    optical_density,
    slide_stains,
    stain_matrix,
)
from wsi_assist.store import SlideStore


def _rgb_of(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(255 * 10 ** -od), 0, 255).astype(np.uint8)


def test_deconvolution_recovers_stain_amounts() -> None:
    stains = default_vectors("brightfield-hdab")
    h, d = np.asarray(HEMATOXYLIN), np.asarray(DAB)
    od = 0.6 * h / np.linalg.norm(h) + 0.3 * d / np.linalg.norm(d)
    out = deconvolve(_rgb_of(od)[None, None], stains)[0, 0]
    np.testing.assert_allclose(out, [0.6, 0.3, 0.0], atol=0.02)


def test_od_of_white_is_zero_and_of_black_is_bounded() -> None:
    od = optical_density(np.array([[255, 255, 255], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(od[0], 0.0)
    np.testing.assert_allclose(od[1], np.log10(255), rtol=1e-5)


@pytest.mark.parametrize("background", [(255, 255, 255), (241.0, 238.5, 243.25)])
def test_od_table_of_8_bit_pixels_equals_computing_each(background) -> None:
    v = np.arange(256, dtype=np.uint8)
    # every value in every channel, in a large image (numpy's vector loops and tails)
    rgb = np.tile(np.stack([v, v[::-1], np.roll(v, 77)], axis=-1), (97, 1)).reshape(
        97, 256, 3)
    table = optical_density(rgb, background)
    each = optical_density(rgb.astype(np.float32), background)
    assert table.dtype == each.dtype == np.float32 and table.shape == (97, 256, 3)
    assert np.array_equal(table, each)
    assert np.array_equal(optical_density(rgb[..., ::-1], background),
                          optical_density(rgb[..., ::-1].astype(np.float32), background))


def test_vectors_must_be_independent() -> None:
    v = default_vectors("brightfield-he")
    with pytest.raises(ValueError, match="independent"):
        type(v)(v.kind, v.names, np.ones((3, 3)))


# -- estimation from slides: synthetic known answers ---------------------------------------

def _unit(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return a / np.linalg.norm(a)


#: Known stains a few degrees off QuPath's defaults, so an estimate cannot pass by
#: returning the defaults.
TRUE_H = _unit((0.70, 0.66, 0.27))
TRUE_E = _unit((0.17, 0.85, 0.50))
TRUE_DAB = _unit((0.31, 0.60, 0.74))
GLASS = (240.0, 238.0, 242.0)


def _stained(first: np.ndarray, second: np.ndarray, n: int, second_share: float = 1.0,
             background: tuple[float, float, float] = GLASS, n_glass: int = 0,
             seed: int = 0) -> np.ndarray:
    """uint8 RGB pixels (n + n_glass, 3): each tissue pixel an amount of stain (OD 0.2..1.2)
    split at random between ``first`` and ``second`` (only ``second_share`` of the pixels
    hold any of the second stain), plus white glass; noise of about one grey level."""
    rng = np.random.default_rng(seed)
    amount = rng.uniform(0.2, 1.2, n)
    split = rng.uniform(0, 1, n) * (rng.uniform(0, 1, n) < second_share)
    od = (amount * (1 - split))[:, None] * first + (amount * split)[:, None] * second
    od = np.concatenate([od, np.zeros((n_glass, 3))])
    rgb = np.asarray(background) * 10.0 ** -od + rng.normal(0, 0.7, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _overview(pixels: np.ndarray, n_tissue: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels as a one-row image and the mask of its first ``n_tissue``."""
    mask = np.zeros(len(pixels), bool)
    mask[:n_tissue] = True
    return pixels[None], mask[None]


def test_he_vectors_and_kind_are_recovered() -> None:
    px = _stained(TRUE_H, TRUE_E, 40_000, n_glass=20_000)
    background = estimate_background(px)
    np.testing.assert_allclose(background, GLASS, atol=1.0)
    tissue = px[:40_000]
    assert detect_kind(tissue, dark_background=False, background=background) == \
        "brightfield-he"
    est = estimate_vectors(tissue, "brightfield-he", background)
    assert est.source == "estimated" and est.reason is None
    assert est.names[:2] == ("Hematoxylin", "Eosin")
    assert angle_deg(est.matrix[0], TRUE_H) < 2 and angle_deg(est.matrix[1], TRUE_E) < 2
    assert est.angles_to_default()[0] > 3  # the defaults would not have passed


def test_hdab_vectors_and_kind_are_recovered() -> None:
    # Ki-67-like: most nuclei negative (haematoxylin only), a fifth with DAB
    px = _stained(TRUE_H, TRUE_DAB, 40_000, second_share=0.2, n_glass=20_000)
    img, mask = _overview(px, 40_000)
    stains = slide_stains(img, mask, dark_background=False)
    assert (stains.kind, stains.source) == ("brightfield-hdab", "estimated")
    assert stains.names[:2] == ("Hematoxylin", "DAB")
    assert angle_deg(stains.matrix[0], TRUE_H) < 3
    assert angle_deg(stains.matrix[1], TRUE_DAB) < 3
    np.testing.assert_allclose(stains.background, GLASS, atol=1.0)
    assert stains.label == "Brightfield H-DAB (estimated stain vectors)"


def test_vectors_are_ordered_haematoxylin_first_whatever_the_data_order() -> None:
    px = _stained(TRUE_E, TRUE_H, 20_000)  # eosin given as the "first" stain
    est = estimate_vectors(px, "brightfield-he", GLASS)
    assert angle_deg(est.matrix[0], TRUE_H) < 2 and angle_deg(est.matrix[1], TRUE_E) < 2


def test_dark_background_is_fluorescence_with_no_vectors_to_estimate() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48, 2] = rng.integers(60, 250, (32, 32))  # DAPI-blue nuclei on black
    mask = img[..., 2] > 0
    assert detect_kind(img[mask], dark_background=True) == "fluorescence"
    stains = slide_stains(img, mask, dark_background=True)
    assert (stains.kind, stains.source) == ("fluorescence", "default")
    assert stains.background == (255.0, 255.0, 255.0) and "do not apply" in (stains.reason or "")
    assert stains.label == "Fluorescence (stain vectors do not apply)"


def test_colours_neither_pair_explains_are_other_brightfield() -> None:
    # e.g. a green dye (absorbs red and blue) and a yellow one (absorbs blue)
    px = _stained(_unit((0.7, 0.1, 0.7)), _unit((0.05, 0.2, 0.98)), 20_000)
    assert detect_kind(px, dark_background=False, background=GLASS) == "brightfield-other"


def test_too_few_stained_pixels_fall_back_to_defaults_with_a_reason() -> None:
    px = _stained(TRUE_H, TRUE_E, 100)
    est = estimate_vectors(px, "brightfield-he", GLASS)
    assert est.source == "default" and "at least 500 are needed" in (est.reason or "")
    np.testing.assert_allclose(est.matrix, default_vectors("brightfield-he").matrix)
    assert est.background == GLASS
    img, mask = _overview(_stained(TRUE_H, TRUE_E, 10, n_glass=1000), 0)  # no tissue at all
    none = slide_stains(img, mask, dark_background=False)
    assert none.source == "default" and "no tissue found" in (none.reason or "")


def test_implausible_estimates_fall_back_to_defaults() -> None:
    near = _stained(TRUE_H, _unit((0.72, 0.64, 0.27)), 20_000)  # two stains 1.5 deg apart
    est = estimate_vectors(near, "brightfield-he", GLASS)
    assert est.source == "default" and "not independent" in (est.reason or "")
    odd = _stained(_unit((0.85, 0.15, 0.5)), TRUE_E, 20_000)  # no haematoxylin in sight
    est = estimate_vectors(odd, "brightfield-he", GLASS)
    assert est.source == "default" and "degrees from the default" in (est.reason or "")


def test_background_is_white_when_nothing_looks_like_glass() -> None:
    assert estimate_background(np.full((20, 20, 3), (200, 120, 180), np.uint8)) == WHITE
    glass = np.full((20, 20, 3), 243, np.uint8)
    glass[:10] = (120, 60, 150)  # tissue, brighter than nothing
    assert estimate_background(glass) == (243.0, 243.0, 243.0)
    # tissue masked out: the glass is what is left, even when tissue is most of the image
    mostly = np.full((100, 20, 3), 232, np.uint8)
    mostly[:90] = (236, 236, 236)  # pale tissue brighter than the glass
    tissue = np.zeros((100, 20), bool)
    tissue[:90] = True
    assert estimate_background(mostly, exclude=tissue) == (232.0, 232.0, 232.0)


def test_config_overrides_win() -> None:
    px = _stained(TRUE_H, TRUE_E, 20_000, n_glass=5_000)
    img, mask = _overview(px, 20_000)
    given = StainParams(vectors="config", hematoxylin=(0.6, 0.7, 0.3), dab=(0.3, 0.6, 0.8),
                        background=(250, 250, 250))
    s = slide_stains(img, mask, False, given)
    assert (s.kind, s.source, s.names[1]) == ("brightfield-hdab", "config", "DAB")
    np.testing.assert_allclose(s.matrix[:2], stain_matrix((0.6, 0.7, 0.3), (0.3, 0.6, 0.8))[:2])
    assert s.background == (250.0, 250.0, 250.0)
    assert s.label == "Brightfield H-DAB (stain vectors from the config)"
    d = slide_stains(img, mask, False, StainParams(vectors="default"))
    assert (d.kind, d.source) == ("brightfield-he", "default") and "config" in (d.reason or "")
    k = slide_stains(img, mask, False, StainParams(kind="brightfield-other"))
    assert (k.kind, k.source) == ("brightfield-other", "estimated")


@pytest.mark.parametrize("stain, message", [
    ({"hematoxylin": [0.6, 0.7, 0.3]}, "stain: hematoxylin is used only with vectors: config"),
    ({"vectors": "config", "hematoxylin": [0.6, 0.7, 0.3]},
     "stain: vectors: config needs hematoxylin and one of eosin or dab"),
    ({"vectors": "config", "hematoxylin": [0.6, 0.7, 0.3], "eosin": [0.2, 0.8, 0.6],
      "kind": "brightfield-hdab"}, "stain: eosin does not fit kind 'brightfield-hdab'"),
    ({"vectors": "config", "hematoxylin": [0.6, 0.7, 0.3], "dab": [1.2, 1.4, 0.6]},
     "stain: hematoxylin and dab must point in different directions"),
    ({"background": [255, 255]}, "stain.background: must be a background [r, g, b]"),
    ({"kind": "ihc"}, "stain.kind: must be one of auto, brightfield-he, brightfield-hdab"),
])
def test_stain_config_errors_name_the_key(stain: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.from_dict({"stain": stain})


def test_stains_round_trip_through_the_store(tmp_path: Path) -> None:
    store = SlideStore(tmp_path, mode="w")
    assert store.read_stains() is None
    s = replace(default_vectors("brightfield-hdab"), background=(241.0, 240.0, 239.5),
                reason="why not")
    store.write_stains(s)
    back = SlideStore(tmp_path, mode="r").read_stains()
    assert back is not None and back.to_json() == s.to_json()
    np.testing.assert_allclose(back.matrix, s.matrix, atol=1e-5)


# -- real slides ----------------------------------------------------------------------------

def _overview_and_tissue(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    from wsi_assist import tissue
    from wsi_assist.lowres import read_lowres
    from wsi_assist.slide import describe, open_slide

    info = describe(path)
    with open_slide(path) as s:
        image, ds = read_lowres(s, info, 8.0)
    found = tissue.detect(image, ds, info.require_mpp())
    return image, found.mask, found.background == "dark"


@pytest.mark.real_slides
@pytest.mark.parametrize("name, kind", [
    ("CMU-1-Small-Region.svs", "brightfield-he"), ("HE_example.ome.tif", "brightfield-he"),
    ("test3-DAPI-2-387.ndpi", "fluorescence")])
def test_real_slides_kind_and_vectors_as_the_pipeline_finds_them(
        shared_slides: Path, name: str, kind: str) -> None:
    image, mask, dark = _overview_and_tissue(shared_slides / name)
    assert mask.any()
    stains = slide_stains(image, mask, dark)
    assert stains.kind == kind
    if kind == "fluorescence":
        assert stains.source == "default"
    else:
        assert stains.source == "estimated", stains.reason
        assert max(stains.angles_to_default()) < 25


@pytest.mark.real_slides
def test_real_ki67_crop_is_hdab(shared_slides: Path) -> None:
    # Its pixels directly: the crop is all tissue, which tissue detection misses today.
    from wsi_assist.slide import open_slide

    with open_slide(shared_slides / "OS-2-vsi-Ki67.ome.tif") as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    px = rgb.reshape(-1, 3)[::3]
    background = estimate_background(rgb)
    assert detect_kind(px, dark_background=False, background=background) == \
        "brightfield-hdab"
    est = estimate_vectors(px, "brightfield-hdab", background)
    assert est.source == "estimated", est.reason
    assert angle_deg(est.matrix[1], DAB) < 10


# -- through a batch ---------------------------------------------------------------------------

def test_batch_report_shows_the_stains(tmp_path: Path, svs_slide: Path) -> None:
    from wsi_assist.batch import run_batch

    cfg = config.from_dict({"stages": ["tissue", "tiles", "report"], "report": {"pdf": False}})
    [res] = run_batch([svs_slide], tmp_path / "auto", cfg)
    assert res.status == "done"
    folder = tmp_path / "auto" / res.slide_id
    st = json.loads((folder / "report.json").read_text())["stain"]
    assert (st["kind"], st["source"], st["reason"]) == ("brightfield-he", "estimated", None)
    assert st["names"] == ["Hematoxylin", "Eosin", "Residual"] and len(st["vectors"]) == 3
    assert st["label"] == "Brightfield H&E (estimated stain vectors)"
    assert [x["name"] for x in st["stains"]] == ["Hematoxylin", "Eosin"]
    assert all(0 <= a < 30 for a in (x["angle_to_default_deg"] for x in st["stains"]))
    assert 230 < min(st["background"])  # the synthetic glass, not 255
    assert "| Image type | Brightfield H&E (estimated stain vectors) |" in \
        (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    assert "Brightfield H&amp;E (estimated stain vectors)" in page and "Eosin" in page

    cfg = config.override(cfg, stain={"kind": "brightfield-hdab", "vectors": "default"})
    [res] = run_batch([svs_slide], tmp_path / "forced", cfg)
    st = json.loads((tmp_path / "forced" / res.slide_id / "report.json").read_text())["stain"]
    assert (st["kind"], st["source"]) == ("brightfield-hdab", "default")
    assert st["reason"] == "stain.vectors is 'default' in the config"
    md = (tmp_path / "forced" / res.slide_id / "report.md").read_text()
    assert "Brightfield H-DAB (default stain vectors)" in md
    assert "Defaults used: stain.vectors is 'default' in the config." in md
