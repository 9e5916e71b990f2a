"""Synthetic findings written into a slide folder through the store's own writers.

The model stages (embed, zeroshot, submodels, caption) are stood in for by arrays with
known content, so report and annotation tests check real outputs against known answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
from PIL import Image

from wsi_assist import geojson
from wsi_assist.store import Embeddings, SlideStore, ZeroShot

CLASSES = ["Tumor", "Stroma", "Necrosis", "Lymphocytes"]
COLORS = [[200, 0, 0], [230, 150, 200], [90, 60, 30], [40, 40, 220]]
KI67_CLASSES = ["Ki-67 positive", "Ki-67 negative"]


def class_of_tiles(coords: np.ndarray, width: int) -> np.ndarray:
    """Known top class per tile: Tumor left third, Stroma middle, Necrosis right third."""
    return np.minimum(2, (coords[:, 0] * 3) // width).astype(np.int16)


def write_findings(slide_dir: Path, nuclei: np.ndarray, width: int, *,
                   captions: bool = True, submodels: bool = True) -> dict:
    """Zero-shot, embeddings, a point and a box detector, a segmentation, captions."""
    st = SlideStore(slide_dir)
    grid = st.read_grid()
    coords = grid.coords
    n = len(coords)
    top = class_of_tiles(coords, width)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.3, (n, len(CLASSES)))
    logits[np.arange(n), top] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    uncertain = np.zeros(n, bool)
    uncertain[0] = True  # one uncertain tile: left out of regions
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    st.write_embeddings(Embeddings(emb.astype(np.float16), model="pathclip-test",
                                   model_sha256="ab" * 32))
    tile_um2 = (grid.read_px * grid.mpp) ** 2
    comp = {c: {"n_tiles": int((top == k).sum()), "area_mm2": float((top == k).sum()
                                                                      * tile_um2 / 1e6),
                "fraction": float((top == k).mean())} for k, c in enumerate(CLASSES)}
    st.write_zeroshot(ZeroShot(classes=CLASSES, colors=[tuple(c) for c in COLORS],
                               probs=probs.astype(np.float32), top=top, uncertain=uncertain,
                               prompt_set="test-set", prompt_sha256="cd" * 32,
                               model="pathclip-test", threshold=0.5, composition=comp))
    out = {"top": top, "probs": probs, "uncertain": uncertain}
    if submodels:
        out.update(_submodels(st, nuclei))
    if captions:
        _captions(st, coords, top)
    return out


def _submodels(st: SlideStore, nuclei: np.ndarray) -> dict:
    m = len(nuclei)
    labels = (np.arange(m) % 3 == 0).astype(np.int16) ^ 1  # a third positive
    scores = np.linspace(0.5, 1.0, m).astype(np.float32)
    meas = np.stack([np.full(m, 12.5), np.arange(m, dtype=np.float64)], 1).astype(np.float32)
    pos = int((labels == 0).sum())
    st.write_submodel("ki67", {"points": nuclei.astype(np.float64), "labels": labels,
                               "scores": scores, "measurements": meas}, {
        "task": "point-detection", "classes": KI67_CLASSES, "colors": [[160, 60, 20],
                                                                        [60, 90, 200]],
        "counts": {"Ki-67 positive": pos, "Ki-67 negative": m - pos},
        "scores": {"Ki-67 index": {"value": pos / m, "definition":
                                   "positive nuclei / all nuclei detected"}},
        "model_path": "models/ki67.onnx", "model_sha256": "ef" * 32},
        array_attrs={"measurements": {"measurement_names": ["Area um^2", "Index"]}})
    boxes = np.concatenate([nuclei[:5] - 6, nuclei[:5] + 6], axis=1)
    st.write_submodel("cells", {"boxes": boxes, "labels": np.zeros(5, np.int16),
                                "scores": np.full(5, 0.9, np.float32)},
                      {"task": "box-detection", "classes": ["Cell"],
                       "colors": [[0, 150, 150]], "counts": {"Cell": 5}, "scores": {},
                       "model_path": "models/cells.onnx", "model_sha256": "12" * 32})
    seg = shapely.Polygon([(100, 100), (400, 100), (400, 300), (100, 300)],
                          [[(200, 150), (300, 150), (300, 250), (200, 250)]])
    path = st.findings_path("sam")
    path.parent.mkdir(exist_ok=True)
    geojson.write_features(path, [
        geojson.feature(seg, "annotation", classification=("Gland", (0, 200, 0)))])
    return {"n_points": m, "n_positive": pos}


def _captions(st: SlideStore, coords: np.ndarray, top: np.ndarray) -> None:
    slide_dir = st.folder
    (slide_dir / "tiles").mkdir(exist_ok=True)
    items = []
    for i in range(min(2, len(coords))):
        rel = f"tiles/cap_{i}.png"
        Image.new("RGB", (64, 64), (230, 140, 190)).save(slide_dir / rel)
        items.append({"x": int(coords[i, 0]), "y": int(coords[i, 1]), "tile_png": rel,
                      "class": CLASSES[int(top[i])], "prob": 0.9,
                      "caption": f"Test caption {i}: pink tissue with purple nuclei.",
                      "model": "captioner-test", "prompt": "Describe the tile."})
    st.write_captions(items)
    st.write_summary({"summary": "Synthetic tissue; tumour-like left, necrosis-like right.",
                      "model": "captioner-test"})


def tiled_slide(out: Path, slide: Path) -> Path:
    """Run the real tissue and tiles stages on ``slide`` into ``out``; the slide folder."""
    from wsi_assist import batch, config

    cfg = config.from_dict({"stages": ["tissue", "tiles"]})
    results = batch.run_batch([slide], out, cfg)
    if results[0].status != "done":
        raise RuntimeError(results[0].error)
    return out / results[0].slide_id


def report_config(**report):  # type: ignore[no-untyped-def]
    """Defaults with small regions kept (the synthetic slide is 1 x 0.75 mm)."""
    from wsi_assist import config

    return config.from_dict({"report": {"min_region_um2": 20000.0, "pdf": False, **report}})
