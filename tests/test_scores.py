"""Slide scores beyond ratio and density: HER2 categories (ASCO/CAP 2018 rules declared in
the spec), PD-L1 CPS beside TPS, H-score; spec validation; end to end to the report."""

from __future__ import annotations

import json
import os
from html import escape as html_escape
from pathlib import Path

import _subnets
import numpy as np
import pytest
import torch
import yaml
from findings_helper import report_config
from stage_helper import run_slide
from torch import nn

from exporters.submodels import export_model
from wsi_assist import config
from wsi_assist.errors import ModelError
from wsi_assist.models.scores import evaluate
from wsi_assist.models.submodel_spec import load_spec, score_from_dict
from wsi_assist.stages import rebuild_report
from wsi_assist.synthetic import default_slide, write_slide

os.environ["HF_HUB_OFFLINE"] = "1"

HER2 = ["tumour 0", "tumour 1+", "tumour 2+", "tumour 3+", "other"]
PDL1 = ["PD-L1+ tumour", "PD-L1- tumour", "PD-L1+ lymphocyte", "PD-L1+ macrophage", "other"]
TUMOUR = HER2[:4]


def her2_score() -> dict:
    """HER2 IHC per ASCO/CAP 2018 (breast), from cell classes."""
    return {
        "kind": "categorical", "denominator": TUMOUR,
        "definition": "HER2 IHC score per ASCO/CAP 2018 from the membrane staining class of "
                      "each invasive tumour cell (% of tumour cells)",
        "rules": [
            {"category": "3+", "rule": "circumferential membrane staining that is complete "
             "and intense in >10 % of tumour cells",
             "when": [{"classes": ["tumour 3+"], "op": ">", "percent": 10}]},
            {"category": "2+", "rule": "weak to moderate complete membrane staining in "
             ">10 % of tumour cells",
             "when": [{"classes": ["tumour 2+", "tumour 3+"], "op": ">", "percent": 10}]},
            {"category": "1+", "rule": "incomplete membrane staining that is faint or barely "
             "perceptible in >10 % of tumour cells",
             "when": [{"classes": ["tumour 1+", "tumour 2+", "tumour 3+"], "op": ">",
                       "percent": 10}]},
            {"category": "0", "rule": "no staining, or incomplete faint membrane staining "
             "in <=10 % of tumour cells"}]}


def hscore() -> dict:
    return {"kind": "hscore", "denominator": TUMOUR,
            "weights": {"tumour 1+": 1, "tumour 2+": 2, "tumour 3+": 3},
            "definition": "H-score = 1 x %1+ + 2 x %2+ + 3 x %3+ of tumour cells (0-300)"}


def pdl1_scores() -> dict:
    return {
        "TPS": {"kind": "ratio", "numerator": ["PD-L1+ tumour"], "scale": 100,
                "denominator": ["PD-L1+ tumour", "PD-L1- tumour"],
                "definition": "tumour proportion score: PD-L1-positive tumour cells / "
                              "viable tumour cells x 100"},
        "CPS": {"kind": "cps", "numerator": ["PD-L1+ tumour", "PD-L1+ lymphocyte",
                                             "PD-L1+ macrophage"],
                "denominator": ["PD-L1+ tumour", "PD-L1- tumour"],
                "definition": "combined positive score: PD-L1-positive tumour cells, "
                              "lymphocytes and macrophages / viable tumour cells x 100, "
                              "capped at 100"}}


def _counts(*values: int) -> dict[str, int]:
    return dict(zip(HER2, values, strict=True))


@pytest.mark.parametrize(("counts", "category"), [
    ((80, 5, 4, 11, 50), "3+"),     # 11 % intense complete
    ((80, 5, 5, 10, 50), "2+"),     # 3+ exactly 10 %: not > 10; complete 15 %
    ((85, 5, 5, 5, 0), "1+"),       # complete 10 %: not 2+; any staining 15 %
    ((90, 5, 3, 2, 9), "0"),        # stained 10 %: not > 10
    ((100, 0, 0, 0, 0), "0"),
])
def test_her2_categories_follow_declared_rules(counts, category) -> None:
    s = evaluate(score_from_dict("HER2", her2_score()), _counts(*counts), 1.0)
    assert s["value"] == category and s["kind"] == "categorical"
    assert s["rule"] == next(r["rule"] for r in her2_score()["rules"]
                             if r["category"] == category)
    assert [r["category"] for r in s["rules"]] == ["3+", "2+", "1+", "0"]
    assert s["rules"][s["met"]]["category"] == category
    assert s["percent"]["tumour 3+"] == pytest.approx(100 * counts[3] / sum(counts[:4]))


def test_her2_without_tumour_cells_is_not_applicable() -> None:
    s = evaluate(score_from_dict("HER2", her2_score()), _counts(0, 0, 0, 0, 30), 1.0)
    assert s["value"] is None and "no tumour 0 / tumour 1+" in s["not_applicable"]


def test_hscore_and_cps() -> None:
    h = evaluate(score_from_dict("H", hscore()), _counts(40, 30, 20, 10, 99), 1.0)
    assert h["value"] == pytest.approx(1 * 30 + 2 * 20 + 3 * 10)  # % of 100 tumour cells
    sc = {k: score_from_dict(k, v) for k, v in pdl1_scores().items()}
    counts = dict(zip(PDL1, (10, 90, 15, 5, 1000), strict=True))
    assert evaluate(sc["TPS"], counts, 1.0)["value"] == pytest.approx(10.0)
    assert evaluate(sc["CPS"], counts, 1.0)["value"] == pytest.approx(30.0)
    counts = dict(zip(PDL1, (10, 10, 300, 5, 0), strict=True))
    assert evaluate(sc["CPS"], counts, 1.0)["value"] == 100.0  # capped


def _spec(tmp_path: Path, scores: dict, classes: list[str] = HER2) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "name": "s", "task": "point-detection", "model": "s.onnx",
        "output": {"classes": classes, "colors": [[0, 0, 0]] * len(classes)},
        "scores": scores}))
    return p


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda s: s["rules"][0]["when"][0].update(classes=["tumour 4+"]),
     ["'tumour 4+'", "valid:", "'tumour 3+'"]),
    (lambda s: s["rules"][1]["when"][0].update(op="more"), ["op 'more'", "'>='"]),
    (lambda s: s.update(kind="grade"), ["kind must be one of", "'categorical'"]),
    (lambda s: s.update(rules=[]), ["needs rules"]),
    (lambda s: s.update(rule=[]), ["unknown key 'rule'", "'rules'"]),
    (lambda s: s["rules"][0]["when"][0].update(percent=110), ["percent must be in 0..100"]),
    (lambda s: s["rules"][2].pop("rule"), ["rule text"]),
    (lambda s: s["rules"][0]["when"][0].pop("percent"), ["needs percent"]),
    (lambda s: s["rules"][0].update(when={"classes": ["tumour 3+"]}),
     ["'when' must be a list of mappings"]),
    (lambda s: s["rules"][0].update(if_=1), ["unknown key 'if_'", "'when'"]),
    (lambda s: s.update(weights=["tumour 1+"]), ["weights must map class -> weight"]),
    (lambda s: s.pop("kind"), ["needs a kind", "'hscore'"]),
])
def test_bad_score_specs_give_one_line(tmp_path, mutate, words) -> None:
    s = her2_score()
    mutate(s)
    with pytest.raises(ModelError) as e:
        load_spec(_spec(tmp_path, {"HER2": s}))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "s.yaml") in msg
    for w in words:
        assert w in msg


def test_hscore_unknown_weight_class(tmp_path) -> None:
    h = hscore()
    h["weights"]["tumour 9+"] = 3
    with pytest.raises(ModelError, match=r"unknown class 'tumour 9\+'; valid: \["):
        load_spec(_spec(tmp_path, {"H": h}))


class ClassedPoints(nn.Module):
    """Stain-peak nuclei (the weight-free StainPoints) labelled with one of ``n`` classes
    from a random permutation indexed by a hash of the point position: a stand-in for a
    cell classifier head that spreads cells over every class."""

    table: torch.Tensor

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.points = _subnets.StainPoints()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randint(0, n, (97,), generator=g),
                             persistent=False)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pts, scores, _, _ = self.points(tiles)
        key = (pts[..., 0].long() * 31 + pts[..., 1].long() * 17) % 97
        return pts, scores, self.table[key]


def _point_spec(name: str, classes: list[str], scores: dict) -> dict:
    spec = _subnets.stain_points_spec(name)
    spec["output"].update(classes=classes, colors=[[40 * i, 100, 200 - 40 * i]
                                                   for i in range(len(classes))])
    del spec["output"]["measurement_names"], spec["extra_outputs"]
    spec["scores"] = scores
    return spec


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    export_model(ClassedPoints(len(HER2), 5).eval(), models,
                 _point_spec("her2", HER2, {"HER2": her2_score(), "H-score": hscore()}),
                 atol=1e-4)
    export_model(ClassedPoints(len(PDL1), 6).eval(), models,
                 _point_spec("pdl1", PDL1, pdl1_scores()), atol=1e-4)
    slide = write_slide(tmp_path_factory.mktemp("sl") / "s.svs", default_slide(1024, 768, seed=3),
                        mpp=0.5, quality=95)
    out = tmp_path_factory.mktemp("run")
    cfg = config.override(config.load(), tiling={"tile_px": 128},
                          parallelism={"device": "cpu"},
                          submodels={"specs": [str(models / "her2.yaml"),
                                               str(models / "pdl1.yaml")]})
    run_slide(slide, out, cfg, ("tissue", "tiles", "submodels"))
    rebuild_report(out, report_config())
    return out


def test_scores_end_to_end_to_report(scored_run: Path) -> None:
    report = json.loads((scored_run / "report.json").read_text())
    subs = {m["name"]: m for m in report["submodels"]}
    her2, pdl1 = subs["her2"], subs["pdl1"]
    c = her2["counts"]
    assert sum(c[k] for k in TUMOUR) > 20  # the random head spreads cells over classes
    want = evaluate(score_from_dict("HER2", her2_score()), c, 1.0)
    assert her2["scores"]["HER2"]["value"] == want["value"] in ("0", "1+", "2+", "3+")
    assert her2["scores"]["HER2"]["rule"] == want["rule"]
    n = sum(c[k] for k in TUMOUR)
    h = 100 * (c["tumour 1+"] + 2 * c["tumour 2+"] + 3 * c["tumour 3+"]) / n
    assert her2["scores"]["H-score"]["value"] == pytest.approx(h)
    p = pdl1["counts"]
    den = p["PD-L1+ tumour"] + p["PD-L1- tumour"]
    cps = min(100.0, 100 * (p["PD-L1+ tumour"] + p["PD-L1+ lymphocyte"]
                            + p["PD-L1+ macrophage"]) / den)
    assert pdl1["scores"]["CPS"]["value"] == pytest.approx(cps)
    assert pdl1["scores"]["TPS"]["value"] == pytest.approx(100 * p["PD-L1+ tumour"] / den)
    md = (scored_run / "report.md").read_text()
    html = (scored_run / "report.html").read_text()
    for text in (md, html):
        assert "ASCO/CAP 2018" in text and "capped at 100" in text and "0-300" in text
        for r in her2_score()["rules"]:
            assert html_escape(r["rule"]) in text or r["rule"] in text
    assert f"**HER2**: {want['value']}." in md and "(met)" in md
    feats = json.loads((scored_run / "annotations.geojson").read_text())["features"]
    names = {f["properties"].get("classification", {}).get("name") for f in feats
             if f["properties"]["objectType"] == "detection"}
    assert names & set(HER2) and names & set(PDL1)
    assert np.isfinite(her2["scores"]["H-score"]["value"])
