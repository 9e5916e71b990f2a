"""Nuclei on fluorescence: a generated multichannel OME-TIFF with known nuclei (disks in
DAPI, a CD8 marker on a known subset) through the stages, and the real DAPI NDPI."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from stage_helper import run_slide
from test_multichannel import write_ome

from wsi_assist import config
from wsi_assist import nuclei_fluorescence as nf
from wsi_assist.settings import NucleiParams
from wsi_assist.store import SUB_MEASUREMENTS, SUB_POINTS, SlideStore

W, H = 1024, 768
NAMES = ["DAPI", "CD8 (Opal 520)", "PanCK"]
#: Raw intensities (16-bit): DAPI and CD8 inside nuclei (background + signal), and the
#: flat PanCK channel.
DAPI_BG, DAPI_ON = 300.0, 4300.0
CD8_BG, CD8_ON = 200.0, 2700.0
PANCK = 500.0
RADIUS = 7  # px at 0.5 um/px: 3.5 um, about 38 um^2


def known_slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, H, W) uint16 planes, the nuclei centres (N, 2) x, y and which are CD8+."""
    rng = np.random.default_rng(seed)
    out = np.stack([rng.normal(DAPI_BG, 30, (H, W)), rng.normal(CD8_BG, 20, (H, W)),
                    rng.normal(PANCK, 25, (H, W))]).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    centres, positive = [], []
    for i, cy in enumerate(range(150, 620, 26)):
        for j, cx in enumerate(range(150, 880, 26)):
            x, y = cx + rng.integers(-4, 5), cy + rng.integers(-4, 5)
            disk = (xx - x) ** 2 + (yy - y) ** 2 <= RADIUS ** 2
            out[0][disk] += DAPI_ON - DAPI_BG
            pos = (i * 7 + j) % 3 == 0
            if pos:
                out[1][disk] += CD8_ON - CD8_BG
            centres.append((x + 0.5, y + 0.5))
            positive.append(pos)
    return out.clip(0, 65535).astype(np.uint16), np.array(centres), np.array(positive)


def _cfg(**sections: dict[str, Any]) -> Any:
    return config.override(config.load(), report={"pdf": False},
                           submodels={"specs": ["nuclei"]}, **sections)


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fluo")
    data, centres, positive = known_slide()
    path = write_ome(folder / "known.ome.tif", data, NAMES)
    out = folder / "out" / "known"
    _, summary = run_slide(path, out, _cfg(), ("tissue", "tiles", "submodels", "report"))
    return {"out": out, "summary": summary, "centres": centres, "positive": positive}


def test_counts_and_channel_means_on_known_nuclei(known: dict[str, Any]) -> None:
    store = SlideStore(known["out"], "r")
    sub = store.read_submodel("nuclei")
    assert sub.skipped is None
    pts = sub.read(SUB_POINTS)
    centres, positive = known["centres"], known["positive"]
    assert abs(len(pts) - len(centres)) <= 0.03 * len(centres)
    # each detection on a known nucleus, within a pixel or two
    d = np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2)
    nearest = d.argmin(axis=1)
    assert np.median(d.min(axis=1)) < 1.0 and (d.min(axis=1) < 3).mean() > 0.97
    m = sub.read(SUB_MEASUREMENTS)
    names = sub.measurement_names
    for c in NAMES:
        assert f"Nucleus: {c} mean" in names
    dapi = m[:, names.index("Nucleus: DAPI mean")]
    cd8 = m[:, names.index("Nucleus: CD8 (Opal 520) mean")]
    panck = m[:, names.index("Nucleus: PanCK mean")]
    pos = positive[nearest]
    # outlines follow the disks: their means are those of the disks' pixels (a smoothed
    # boundary may take in a pixel of background now and then)
    assert np.median(dapi) == pytest.approx(DAPI_ON, rel=0.04)
    assert np.median(cd8[pos]) == pytest.approx(CD8_ON, rel=0.04)
    assert np.median(cd8[~pos]) == pytest.approx(CD8_BG, abs=30)
    assert np.median(panck) == pytest.approx(PANCK, abs=15)
    assert cd8[pos].min() > 5 * cd8[~pos].max()  # the subset is told apart, nucleus by nucleus
    area = m[:, names.index("Nucleus: Area µm^2")]
    assert np.median(area) == pytest.approx(np.pi * RADIUS ** 2 * 0.25, rel=0.15)
    # the slide's channel means: mean of the nucleus means
    scores = sub.attrs["scores"]
    assert scores[nf.channel_mean_key("CD8 (Opal 520)")]["value"] == pytest.approx(float(cd8.mean()),
                                                                          rel=1e-4)
    assert sub.attrs["parameters"]["detectionImage"] == "DAPI"
    assert "thresholdPositive1" not in sub.attrs["parameters"]


def test_no_dab_scores_on_fluorescence(known: dict[str, Any]) -> None:
    sub = SlideStore(known["out"], "r").read_submodel("nuclei")
    for key in ("positive_percent", "h_score"):
        s = sub.attrs["scores"][key]
        assert s["value"] is None and "fluorescence" in s["not_applicable"]
    assert sub.attrs["classified"] is False
    assert sub.attrs["stains"] is None  # no stain vectors printed for fluorescence


def test_report_and_qupath_export(known: dict[str, Any]) -> None:
    out = known["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["submodels"]["status"] == "done"
    md = (out / "report.md").read_text()
    assert "Nucleus: CD8 (Opal 520) mean, mean of nuclei" in md and "not applicable" in md
    feats = json.loads((out / "annotations.geojson").read_text())["features"]
    cells = [f for f in feats if f["properties"].get("objectType") in ("detection", "cell")]
    assert cells
    meas = cells[0]["properties"]["measurements"]
    assert {"Nucleus: DAPI mean", "Nucleus: CD8 (Opal 520) mean",
            "Nucleus: PanCK mean", "Nucleus: Area µm^2"} <= set(meas)


def test_fixed_threshold_and_rgb_channel_choice() -> None:
    data, _, _ = known_slide(seed=1)
    planes = np.moveaxis(data, 0, -1)[100:400, 100:400]
    tissue = np.ones(planes.shape[:2], bool)
    auto = nf.setup(planes, tissue, NAMES, (0, "by name"), NucleiParams())
    assert 0 < auto.threshold < DAPI_ON - DAPI_BG
    high = nf.setup(planes, tissue, NAMES, (0, "by name"),
                    NucleiParams(fluorescenceThreshold=1e5))
    assert high.threshold == 1e5 and not len(nf.detect(planes, 0.5, high))
    assert len(nf.detect(planes, 0.5, auto)) > 50
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[::3, ::3, 2] = 200  # nuclei in blue
    assert nf.rgb_nuclear_channel(rgb.reshape(-1, 3))[0] == 2
    rgb[..., 2] = 0
    rgb[::3, ::3, 1] = 200  # a green nuclear stain
    assert nf.rgb_nuclear_channel(rgb.reshape(-1, 3))[0] == 1


def test_detection_picture_is_read_from_the_planes(known: dict[str, Any]) -> None:
    """The outlines are drawn on a sharp pseudo-colour field read from the slide's
    planes (DAPI blue), not on the soft overview."""
    from PIL import Image

    path = known["out"] / "overlays" / "nuclei_detections.png"
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)[40:-40, 10:-10]
    blue = img[..., 2]
    # sharp: dark background between bright (blue) nuclei; the flat PanCK channel (red)
    # is a faint haze, not noise stretched to full brightness
    assert (blue < 60).mean() > 0.3 and (blue > 200).mean() > 0.1
    assert np.median(img[..., 0][blue < 60]) < 60


def test_real_dapi_ndpi(shared_slides: Any, tmp_path: Any) -> None:
    """The RGB NDPI of DAPI: nuclei on the blue channel, all inside the tissue, at a
    density and size of real nuclei; no DAB scores, and the report says why; the picture
    of the detections was looked at (outlines on the nuclei of a sharp field)."""
    import shapely

    out = tmp_path / "dapi"
    ctx, _ = run_slide(shared_slides / "test3-DAPI-2-387.ndpi", out,
                       _cfg(parallelism={"device": "cpu"}),
                       ("tissue", "tiles", "submodels", "report"))
    sub = ctx.store.read_submodel("nuclei")
    a = sub.attrs
    assert a["fluorescence"]["nuclear_channel"] == "Blue"
    pts = sub.read(SUB_POINTS)
    assert len(pts) > 1000
    geometry = ctx.store.read_tissue().geometry
    assert shapely.contains_xy(geometry, pts[:, 0], pts[:, 1]).mean() > 0.99
    s = a["scores"]
    assert 1000 < s["nucleus_density_per_mm2"]["value"] < 20000
    assert 12 < s["median_nucleus_area_um2"]["value"] < 60
    m = sub.read(SUB_MEASUREMENTS)
    blue = m[:, sub.measurement_names.index("Nucleus: Blue mean")]
    red = m[:, sub.measurement_names.index("Nucleus: Red mean")]
    assert np.median(blue) > 5 * max(np.median(red), 1.0)
    assert s[nf.channel_mean_key("Blue")]["value"] == pytest.approx(float(blue.mean()), rel=1e-4)
    assert "fluorescence" in s["positive_percent"]["not_applicable"]
    assert (out / "overlays" / "nuclei_detections.png").is_file()
    assert "not applicable" in (out / "report.md").read_text()
