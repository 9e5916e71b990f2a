"""Zero-shot maths, prompt sets, the text cache, eval zeroshot and the stages end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from tinyclip import TINY_ARCH, register_tiny, save_tiny
from typer.testing import CliRunner

from wsi_assist import config as config_mod
from wsi_assist.errors import ConfigError
from wsi_assist.models import zeroshot as zs
from wsi_assist.models.evaluate import metrics

os.environ["HF_HUB_OFFLINE"] = "1"

TWO_CLASS = """
name: two
templates: ["An H&E image of {}.", "A photomicrograph of {}."]
classes:
  - {name: Red, aliases: [r], color: [255, 0, 0], names: [red tissue]}
  - {name: Blue, color: [0, 0, 255], names: [blue tissue], prompts: ["Blue cells."]}
"""


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tinyzs")
    register_tiny(d)
    return f"{TINY_ARCH}:{save_tiny(d / 'tiny.pt', seed=3)}"


@pytest.fixture()
def two_class(tmp_path: Path) -> Path:
    p = tmp_path / "two.yaml"
    p.write_text(TWO_CLASS)
    return p


def test_probabilities_match_a_hand_computation() -> None:
    classes = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    text = zs.TextEmbeddings(classes, logit_scale=10.0)
    emb = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)  # cosines (0.6, 0.8) and (0, 1)
    probs = zs.classify(emb, text)
    p0 = math.exp(6) / (math.exp(6) + math.exp(8))
    np.testing.assert_allclose(probs[0], [p0, 1 - p0], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / (1 + math.exp(10)), 1 / (1 + math.exp(-10))],
                               rtol=1e-5)


def test_prompt_ensemble_is_the_renormalised_mean() -> None:
    e = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    out = zs.class_embeddings(e, [2, 1])
    np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5, 0], [0, 0, 1]], rtol=1e-6)


def test_prompt_set_expansion_and_hash(two_class: Path) -> None:
    ps = zs.load_prompt_set(str(two_class))
    assert ps.name == "two" and ps.names == ["Red", "Blue"]
    assert ps.classes[0].prompts == ("An H&E image of red tissue.",
                                     "A photomicrograph of red tissue.")
    assert ps.classes[1].prompts[0] == "Blue cells." and len(ps.classes[1].prompts) == 3
    assert ps.colors == [[255, 0, 0], [0, 0, 255]]
    assert ps.class_index("R") == 0 and ps.class_index("blue") == 1
    assert ps.class_index("green") is None
    changed = two_class.with_name("changed.yaml")
    changed.write_text(TWO_CLASS.replace("Blue cells.", "Blue nuclei."))
    assert zs.load_prompt_set(str(changed)).sha256 != ps.sha256


@pytest.mark.parametrize("old, new, message", [
    ("color: [0, 0, 255]", "color: [0, 0, 300]", "color of 'Blue' must be"),
    ("{name: Blue,", "{name: red,", "duplicate class names"),
    ('"A photomicrograph of {}."', '"A photomicrograph."', "templates must be strings "
                                                           "containing"),
    ("names: [red tissue]", "", "prompts of 'Red': none given"),
    ("name: two", "name: two\ndataset: {layout: zip}", "dataset.layout 'zip' is not one of "
                                                        "folders, pcam_h5"),
])
def test_bad_prompt_sets_name_the_problem(tmp_path: Path, old: str, new: str,
                                          message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(TWO_CLASS.replace(old, new))
    with pytest.raises(ConfigError, match=f"bad.yaml: .*{message}"):
        zs.load_prompt_set(str(p))


def test_shipped_prompt_sets() -> None:
    sets = {n: zs.load_prompt_set(n) for n in zs.shipped_prompt_sets()}
    assert {"crc100k", "lc25000_lung", "lc25000_colon", "wsss4luad", "bach"} <= set(sets)
    crc = sets["crc100k"]
    assert len(crc.classes) == 9
    assert [crc.class_index(a) for a in ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM",
                                         "STR", "TUM"]] == list(range(9))
    assert sets["lc25000_lung"].class_index("lung_scc") == 2
    benchmarks = {"crc100k", "lc25000_lung", "lc25000_colon", "bach", "wsss4luad", "pcam",
                  "skincancer", "osteo", "sicapv2"}
    assert benchmarks <= set(sets)
    assert all(sets[n].source for n in benchmarks)
    # the published protocols: one template and one class name per class
    assert crc.classes[8].prompts == ("An H&E patch of colorectal adenocarcinoma epithelium",)
    assert sets["wsss4luad"].names == ["Tumor", "Normal"]  # binary, as published
    assert sets["wsss4luad"].classes[0].prompts == ("An H&E image of tumor tissue.",)
    metastases = "an H&E patch of lymph nodes containing metastases"
    assert sets["pcam"].classes[1].prompts == (metastases,)
    assert len(sets["skincancer"].classes) == 16 and len(sets["sicapv2"].classes) == 4
    assert [len(c.prompts) for n in benchmarks - {"bach"} for c in sets[n].classes] == \
        [1] * sum(len(sets[n].classes) for n in benchmarks - {"bach"})
    with pytest.raises(ConfigError, match="no prompt set 'nope'"):
        zs.load_prompt_set("nope")


def test_composition_by_hand() -> None:
    top = np.array([0, 0, 1, 1], np.int16)
    unc = np.array([False, False, False, True])
    frac = np.array([1.0, 0.5, 1.0, 0.5], np.float32)
    per, u = zs.composition(top, unc, frac, 0.01, ["A", "B"])
    assert per["A"] == {"n_tiles": 2, "area_mm2": pytest.approx(0.015),
                        "fraction": pytest.approx(0.5)}
    assert per["B"]["n_tiles"] == 1 and per["B"]["fraction"] == pytest.approx(1 / 3)
    assert u["area_mm2"] == pytest.approx(0.005) and u["fraction"] == pytest.approx(1 / 6)


def test_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 0, 2])
    m = metrics(y, p, 3)
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 0.5, 1.0]  # P = R for classes 0 and 1
    assert m["weighted_f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + f1[2]) / 6)


def test_text_cache_is_keyed_by_model_and_prompts(tiny_spec: str, two_class: Path,
                                                  tmp_path: Path) -> None:
    from wsi_assist.models.pathclip import load_model

    lm = load_model(tiny_spec)
    ps = zs.load_prompt_set(str(two_class))
    first = zs.text_embeddings(lm, ps, cache=str(tmp_path), model_sha256=lm.sha256)
    assert first.classes.shape == (2, 32) and first.logit_scale == pytest.approx(1 / 0.07,
                                                                                rel=1e-4)
    assert len(list(tmp_path.glob(f"{lm.sha256[:16]}-{ps.sha256[:16]}.npz"))) == 1
    # a hit never loads the model: this spec would fail to parse
    again = zs.text_embeddings("not-a-spec", ps, cache=str(tmp_path), model_sha256=lm.sha256)
    np.testing.assert_array_equal(again.classes, first.classes)
    with pytest.raises(Exception, match="not-a-spec"):
        zs.text_embeddings("not-a-spec", ps, cache=str(tmp_path), model_sha256="0" * 64)


def _labelled_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, rgb in (("r", (200, 40, 40)), ("Blue", (40, 40, 200))):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            px = np.clip(rng.normal(rgb, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / sub / f"{i}.png")


def test_eval_zeroshot_cli(tiny_spec: str, two_class: Path, tmp_path: Path) -> None:
    """Metrics from the CLI equal those of open_clip's own preprocessing and encoders."""
    import open_clip
    import torch
    from PIL import Image

    from wsi_assist.cli import app
    from wsi_assist.models.pathclip import load_model

    _labelled_folder(tmp_path / "data")
    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["eval", "zeroshot", str(tmp_path / "data"), "--prompts",
                                   str(two_class), "--model", tiny_spec, "--device", "cpu",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "balanced accuracy" in res.output and "confusion matrix" in res.output
    m = json.loads(out.read_text())
    assert m["n"] == 6 and m["labels"] == {"Blue": "Blue", "r": "Red"}
    lm = load_model(tiny_spec)
    _, _, tf = open_clip.create_model_and_transforms(TINY_ARCH, load_weights=False)
    ps = zs.load_prompt_set(str(two_class))
    tok = open_clip.get_tokenizer(TINY_ARCH)
    with torch.no_grad():
        t = lm.model.encode_text(tok([p for c in ps.classes for p in c.prompts]))
        t = torch.nn.functional.normalize(t, dim=-1)
        cls = torch.nn.functional.normalize(torch.stack([t[:2].mean(0), t[2:].mean(0)]), dim=-1)
        files = sorted((tmp_path / "data" / "Blue").glob("*.png")) + sorted(
            (tmp_path / "data" / "r").glob("*.png"))
        x = torch.stack([tf(Image.open(f)) for f in files])
        pred = (lm.model.encode_image(x) @ cls.T).argmax(1).numpy()
    expected = metrics(np.array([1, 1, 1, 0, 0, 0]), pred, 2)
    assert m["confusion"] == expected["confusion"]
    assert m["accuracy"] == pytest.approx(expected["accuracy"])
    (tmp_path / "data" / "green").mkdir()
    res = CliRunner().invoke(app, ["eval", "zeroshot", str(tmp_path / "data"), "--prompts",
                                   str(two_class), "--model", tiny_spec])
    assert res.exit_code == 2 and "['green'] match no class" in res.output


def _config(tmp_path: Path, spec: str | None, **zeroshot: object) -> config_mod.Config:
    d = config_mod.load().to_dict()
    d["stages"] = ["tissue", "tiles", "embed", "zeroshot"]
    d["embed"]["model"] = spec or "pathclip"
    d["zeroshot"].update({"cache_dir": str(tmp_path / "cache"), **zeroshot})
    d["parallelism"]["device"] = "cpu"
    return config_mod.from_dict(d)


def _check_slide(out: Path, slide_id: str, spec: str, threshold: float) -> None:
    import torch

    from wsi_assist.models.pathclip import encode_images, load_model
    from wsi_assist.store import SlideStore
    from wsi_assist.stream import stream

    g = SlideStore(out / slide_id, mode="r")
    grid = g.read_grid()
    stored = g.read_embeddings()
    assert stored is not None
    emb = stored.vectors
    assert emb.dtype == np.float16 and emb.shape == (len(grid), 32) and len(grid) > 0
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    assert stored.model == spec
    # row k is the embedding of grid tile k
    path = Path(str(g.read_slide().path))
    last = list(stream(path, grid, batch_size=len(grid)))[-1]
    k = int(last.index[-1])
    ref = encode_images(load_model(spec), torch.from_numpy(last.tiles[-1:])).numpy()[0]
    np.testing.assert_allclose(emb[k], ref, atol=2e-3)
    found = g.read_zeroshot()
    assert found is not None
    probs, top, unc = found.probs, found.top, found.uncertain
    assert probs.shape == (len(grid), 9) and top.dtype == np.int16
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(top, probs.argmax(1))
    np.testing.assert_array_equal(unc, probs.max(1) < threshold)
    unc_sum = found.uncertain_summary
    assert found.prompt_set == "crc100k" and len(found.classes) == len(found.colors) == 9
    comp = found.composition
    assert sum(c["n_tiles"] for c in comp.values()) + unc_sum["n_tiles"] == len(grid)
    assert sum(c["fraction"] for c in comp.values()) + unc_sum["fraction"] == \
        pytest.approx(1.0)
    tile_mm2 = (grid.tile_px * grid.delivered_mpp / 1000) ** 2
    total = sum(c["area_mm2"] for c in comp.values()) + unc_sum["area_mm2"]
    assert total == pytest.approx(float(grid.tissue_fraction.sum()) * tile_mm2, rel=1e-4)


def test_embed_and_zeroshot_on_a_synthetic_slide(svs_slide: Path, tiny_spec: str,
                                                 tmp_path: Path) -> None:
    from wsi_assist.batch import run_batch

    res = run_batch([svs_slide], tmp_path / "out", _config(tmp_path, tiny_spec,
                                                           threshold=0.2))
    assert [r.status for r in res] == ["done"], res[0].error
    _check_slide(tmp_path / "out", res[0].slide_id, tiny_spec, 0.2)


def test_stages_not_run_without_a_model(svs_slide: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_assist.batch import run_batch
    from wsi_assist.store import SlideStore

    monkeypatch.delenv("WSI_ASSIST_PATHCLIP", raising=False)
    res = run_batch([svs_slide], tmp_path / "out", _config(tmp_path, None))
    assert res[0].status == "done"
    g = SlideStore(tmp_path / "out" / res[0].slide_id, mode="r")
    assert not g.has_embeddings()
    assert "embed.pathclip" in (g.skipped("embed") or "")
    assert "WSI_ASSIST_PATHCLIP" in (g.skipped("zeroshot") or "")


def test_missing_weights_stop_the_run_before_any_slide(svs_slide: Path,
                                                        tmp_path: Path) -> None:
    from wsi_assist.batch import run_batch
    from wsi_assist.errors import ModelError

    missing = tmp_path / "pathclip-base.pt"
    cfg = config_mod.override(_config(tmp_path, "pathclip"), embed={"pathclip": str(missing)})
    with pytest.raises(ModelError, match=f"{missing}: model file not found"):
        run_batch([svs_slide], tmp_path / "out", cfg)
    assert not (tmp_path / "out" / "manifest.csv").exists()


@pytest.mark.real_slides
def test_embed_and_zeroshot_on_the_real_slides(shared_slides: Path, tiny_spec: str,
                                               tmp_path: Path) -> None:
    from wsi_assist.batch import run_batch

    slides = [shared_slides / "CMU-1-Small-Region.svs", shared_slides / "HE_example.ome.tif"]
    res = run_batch(slides, tmp_path / "out", _config(tmp_path, tiny_spec))
    for r in res:
        assert r.status == "done", r.error
        _check_slide(tmp_path / "out", r.slide_id, tiny_spec, 0.5)


def test_text_cache_defaults_to_out_never_the_home_cache(
        svs_slide: Path, tiny_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    from wsi_assist.batch import run_batch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res = run_batch([svs_slide], tmp_path / "out", _config(tmp_path, tiny_spec,
                                                           cache_dir=None))
    assert [r.status for r in res] == ["done"], res[0].error
    assert list((tmp_path / "out" / ".cache" / "text-embeddings").glob("*.npz"))
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
    assert zs.cache_dir(None) is None  # outside a batch: no cache unless one is named
