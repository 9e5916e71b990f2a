"""eval zeroshot reads each benchmark in its released layout, with the shipped prompt sets.

Tiny fake datasets are written in the layouts the datasets are released in; labels must
come back mapped to the prompt set's classes in the published order.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tinyclip import TINY_ARCH, register_tiny, save_tiny
from typer.testing import CliRunner

from wsi_assist.errors import WsiAssistError
from wsi_assist.models import datasets
from wsi_assist.models.zeroshot import load_prompt_set

os.environ["HF_HUB_OFFLINE"] = "1"


def _png(path: Path, seed: int, size: int = 40, suffix: str = "") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(px).save(path)
    return path


def test_crc100k_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "CRC-VAL-HE-7K"
    for i, cls in enumerate(["ADI", "TUM", "NORM"]):
        for k in range(i + 1):
            _png(root / cls / f"{cls}-{k}.tif", i * 10 + k)
    p = datasets.read(root, load_prompt_set("crc100k"))
    assert sorted(p.labels.tolist()) == [0, 6, 6, 6, 8, 8]  # ADI, TUM x2, NORM x3
    assert p.labels_found == {"ADI": "Adipose", "NORM": "Normal mucosa", "TUM": "Tumor"}
    assert len(p.read(0, 6)) == 6 and p.read(0, 1)[0].mode == "RGB"


def test_lc25000_from_the_release_root(tmp_path: Path) -> None:
    """lung_colon_image_set/{lung,colon}_image_sets/<class>: the lung set takes its own."""
    root = tmp_path / "lung_colon_image_set"
    for k, cls in enumerate(["lung_n", "lung_aca", "lung_scc"]):
        _png(root / "lung_image_sets" / cls / f"{cls}1.jpeg", k)
    _png(root / "colon_image_sets" / "colon_aca" / "colonca1.jpeg", 9)
    lung = datasets.read(root, load_prompt_set("lc25000_lung"))
    assert sorted(lung.labels.tolist()) == [0, 1, 2]
    colon = datasets.read(root, load_prompt_set("lc25000_colon"))
    assert colon.labels.tolist() == [1]


def test_two_splits_under_one_root_is_an_error(tmp_path: Path) -> None:
    for split in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        _png(tmp_path / split / "ADI" / "a.tif", 0)
    with pytest.raises(WsiAssistError, match="class folders under several folders .*point "
                                             "at one of them"):
        datasets.read(tmp_path, load_prompt_set("crc100k"))


def test_bach_photos(tmp_path: Path) -> None:
    root = tmp_path / "ICIAR2018_BACH_Challenge"
    for k, cls in enumerate(["Benign", "InSitu", "Invasive", "Normal"]):
        _png(root / "Photos" / cls / f"{cls[:2].lower()}001.tif", k)
    (root / "Photos" / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\n")
    p = datasets.read(root, load_prompt_set("bach"))
    assert sorted(p.labels.tolist()) == [0, 1, 2, 3]


def test_pcam_hdf5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(0).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], np.uint8).reshape(5, 1, 1, 1)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = y
    p = datasets.read(tmp_path, load_prompt_set("pcam"))
    assert p.labels.tolist() == [0, 1, 1, 0, 1]
    np.testing.assert_array_equal(np.asarray(p.read(3, 5)[1]), x[4])


def test_pcam_still_gzipped_says_so(tmp_path: Path) -> None:
    (tmp_path / "camelyonpatch_level_2_split_test_x.h5.gz").write_bytes(b"x")
    with pytest.raises(WsiAssistError, match="test_x.h5: PCam file not found; found "
                                             ".*gz: gunzip it first"):
        datasets.read(tmp_path, load_prompt_set("pcam"))


def test_wsss4luad_binary_as_published(tmp_path: Path) -> None:
    tr = tmp_path / "WSSS4LUAD" / "1.training"
    names = {"1-0-0-[1, 0, 0].png": 0, "2-0-0-[1, 1, 0].png": 0, "3-0-0-[0, 1, 0].png": 1,
             "4-0-0-[0, 0, 1].png": 1, "5-0-0-[0, 1, 1].png": 1}
    for k, n in enumerate(names):
        _png(tr / n, k)
    p = datasets.read(tmp_path / "WSSS4LUAD", load_prompt_set("wsss4luad"))
    assert dict(zip([f.name for f in p.paths], p.labels.tolist(), strict=True)) == names
    _png(tr / "no-label.png", 9)
    with pytest.raises(WsiAssistError, match="no-label.png: no \\[tumor, stroma, normal\\]"):
        datasets.read(tmp_path / "WSSS4LUAD", load_prompt_set("wsss4luad"))


def test_sicapv2_test_partition(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    root = tmp_path / "SICAPv2"
    rows = [("a.jpg", 1, 0, 0, 0, 0), ("b.jpg", 0, 0, 1, 0, 1), ("c.jpg", 0, 1, 1, 0, 0),
            ("d.jpg", 0, 0, 0, 1, 0), ("e.jpg", 0, 1, 0, 0, 0)]
    for k, r in enumerate(rows):
        _png(root / "images" / r[0], k)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["image_name", "NC", "G3", "G4", "G5", "G4C"])
    for r in rows:
        sheet.append(list(r))
    (root / "partition" / "Test").mkdir(parents=True)
    book.save(root / "partition" / "Test" / "Test.xlsx")
    p = datasets.read(root, load_prompt_set("sicapv2"))
    # c.jpg has two labels and is dropped; G4C does not count
    assert [f.name for f in p.paths] == ["a.jpg", "b.jpg", "d.jpg", "e.jpg"]
    assert p.labels.tolist() == [0, 2, 3, 1]


def test_skincancer_csv_test_rows(tmp_path: Path) -> None:
    rows = [("tiles/a.png", "tumor_skin_melanoma_melanoma", "Test", "tumor"),
            ("tiles/b.png", "nontumor_skin_dermis_dermis", "Test", "nontumor"),
            ("tiles/c.png", "tumor_skin_epithelial_bcc", "Train", "tumor")]
    for k, r in enumerate(rows[:2]):
        _png(tmp_path / r[0], k)
    with (tmp_path / "tiles-v2.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "set", "malignicy"])
        w.writerows(rows)
    p = datasets.read(tmp_path, load_prompt_set("skincancer"))
    assert p.labels.tolist() == [13, 10]  # Train rows are not read
    # the CSV in a subfolder, paths relative to the dataset root
    (tmp_path / "data").mkdir()
    (tmp_path / "tiles-v2.csv").rename(tmp_path / "data" / "tiles-v2.csv")
    p = datasets.read(tmp_path / "data" / "tiles-v2.csv", load_prompt_set("skincancer"))
    assert p.paths == [tmp_path / "tiles" / "a.png", tmp_path / "tiles" / "b.png"]


def test_osteo_pathologist_validation(tmp_path: Path) -> None:
    d = tmp_path / "Training-Set-1" / "set1"
    _png(d / "Case-3-A15-30821-21738.jpg", 0)
    _png(d / "Case-3-A15-30821-30006.jpg", 1)
    _png(d / "Case-4-B3-1.jpg", 2)
    (d / "PathologistValidation.csv").write_text(
        "Case 3 A15 30821 21738.jpg,Non-Tumor\nCase 3 A15 30821 30006.jpg,Non-Viable-Tumor\n"
        "Case 4 B3 1.jpg,viable: non-viable\nCase 9 missing.jpg,Viable\n")
    p = datasets.read(tmp_path, load_prompt_set("osteo"))
    assert p.labels.tolist() == [0, 1, 2]


def test_unknown_label_names_the_file(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _png(d / "a.jpg", 0)
    (d / "PathologistValidation.csv").write_text("a.jpg,Blurry\n")
    with pytest.raises(WsiAssistError, match="label 'Blurry' matches no class of prompt set "
                                             "'osteo'"):
        datasets.read(tmp_path, load_prompt_set("osteo"))


def test_eval_zeroshot_cli_on_pcam(tmp_path: Path) -> None:
    """End to end: the CLI on a PCam pair with a tiny random CLIP; the confusion matrix
    rows hold the published labels, and predictions equal the model's own argmax."""
    h5py = pytest.importorskip("h5py")
    import torch

    from wsi_assist.cli import app
    from wsi_assist.models.evaluate import fit
    from wsi_assist.models.pathclip import encode_images, encode_text, load_model

    register_tiny(tmp_path)
    spec = f"{TINY_ARCH}:{save_tiny(tmp_path / 'tiny.pt', seed=5)}"
    x = np.random.default_rng(1).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 0, 1, 1, 1, 0], np.uint8)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = y.reshape(6, 1, 1, 1)
    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["eval", "zeroshot", str(tmp_path), "--prompts", "pcam",
                                   "--model", spec, "--device", "cpu", "--batch-size", "4",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["n"] == 6 and m["layout"] == "pcam_h5" and "PathGen" in m["prompt_source"]
    assert [sum(r) for r in m["confusion"]] == [3, 3]
    from PIL import Image

    lm = load_model(spec)
    ps = load_prompt_set("pcam")
    t = encode_text(lm, [c.prompts[0] for c in ps.classes])
    im = encode_images(lm, torch.from_numpy(np.stack([fit(Image.fromarray(a), 32) for a in x])))
    im = torch.nn.functional.normalize(torch.as_tensor(np.asarray(im)), dim=-1).numpy()
    pred = (im @ np.asarray(t).T).argmax(1)
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (y.astype(int), pred), 1)
    assert m["confusion"] == cm.tolist()
