"""Zero-shot evaluation on a benchmark in its released layout (see models/datasets.py).

Released label names (CRC-100K's ``ADI``, LC25000's ``lung_aca``, PCam's 0/1) are matched
to prompt classes by name or alias (case-insensitive). Patches are resized (shorter side)
and centre-cropped to the model's input as open_clip does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.models import datasets
from wsi_assist.models.zeroshot import PromptSet, classify, text_embeddings

log = logging.getLogger(__name__)


def fit(im: Any, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))),
                   Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over classes present), weighted F1 and
    the confusion matrix (rows: true class, columns: predicted)."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    support = cm.sum(axis=1)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = int(support.sum())
    return {"n": total, "accuracy": float(tp.sum() / total) if total else 0.0,
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
            "per_class": {"recall": recall.tolist(), "precision": precision.tolist(),
                          "f1": f1.tolist(), "support": support.tolist()},
            "confusion": cm.tolist()}


def evaluate(root: Path, prompts: PromptSet, model: Any, *, device: str = "cpu",
             batch_size: int = 64, cache: str | None = None) -> dict[str, Any]:
    """Zero-shot predictions for every labelled patch of the benchmark at ``root`` (in
    ``prompts.layout``) and their metrics; ``labels`` maps released labels to classes."""
    import torch

    from wsi_assist.models import pathclip

    patches = datasets.read(root, prompts)
    lm = pathclip.load_model(model, device)
    text = text_embeddings(lm, prompts, cache=cache, model_sha256=lm.sha256)
    preds = []
    for images in patches.batches(batch_size):
        tiles = np.stack([fit(im, lm.image_size) for im in images])
        emb = pathclip.encode_images(lm, torch.from_numpy(tiles).to(lm.device))
        preds.append(classify(emb.cpu().numpy(), text).argmax(axis=1))
    y_pred = np.concatenate(preds)
    out = metrics(patches.labels, y_pred, len(prompts.classes))
    out.update({"classes": prompts.names, "prompt_set": prompts.name,
                "prompt_sha256": prompts.sha256, "prompt_source": prompts.source,
                "layout": prompts.layout, "model": lm.spec.spec, "model_sha256": lm.sha256,
                "labels": patches.labels_found, "root": str(root)})
    return out
