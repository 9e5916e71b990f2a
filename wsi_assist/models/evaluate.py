"""Zero-shot evaluation on a folder of labelled patches (one subfolder per class).

Subfolder names are matched to prompt classes by name or alias (case-insensitive), so
dataset folders (CRC-100K's ``ADI``, LC25000's ``lung_aca``) work as they are. Patches are
resized (shorter side) and centre-cropped to the model's input as open_clip does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import WsiAssistError
from wsi_assist.models.zeroshot import PromptSet, classify, text_embeddings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class LabelledFolder:
    """Image paths and their class indices in the prompt set."""

    paths: list[Path]
    labels: np.ndarray
    folders: dict[str, str]  # subfolder -> class name


def scan(root: Path, prompts: PromptSet) -> LabelledFolder:
    """Images per subfolder of ``root``; every subfolder must map to a prompt class."""
    if not root.is_dir():
        raise WsiAssistError(f"{root}: not a folder of class subfolders")
    paths, labels, folders, unmapped = [], [], {}, []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        idx = prompts.class_index(sub.name)
        if idx is None:
            unmapped.append(sub.name)
            continue
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        folders[sub.name] = prompts.classes[idx].name
        paths += files
        labels += [idx] * len(files)
    if unmapped:
        raise WsiAssistError(f"{root}: subfolders {unmapped!r} match no class of prompt set "
                             f"{prompts.name!r} ({', '.join(prompts.names)}); rename them "
                             "or add aliases to the prompt set")
    if not paths:
        raise WsiAssistError(f"{root}: no images in class subfolders")
    return LabelledFolder(paths, np.asarray(labels, np.int64), folders)


def load_patch(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as f:
        im = f.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))),
                       Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def _batches(paths: list[Path], size: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(paths), batch_size):
        yield np.stack([load_patch(p, size) for p in paths[i:i + batch_size]])


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
    """Zero-shot predictions for every patch under ``root`` and their metrics."""
    import torch

    from wsi_assist.models import pathclip

    folder = scan(root, prompts)
    lm = pathclip.load_model(model, device)
    text = text_embeddings(lm, prompts, cache=cache, model_sha256=lm.sha256)
    preds = []
    for tiles in _batches(folder.paths, lm.image_size, batch_size):
        emb = pathclip.encode_images(lm, torch.from_numpy(tiles).to(lm.device))
        preds.append(classify(emb.cpu().numpy(), text).argmax(axis=1))
    y_pred = np.concatenate(preds)
    out = metrics(folder.labels, y_pred, len(prompts.classes))
    out.update({"classes": prompts.names, "prompt_set": prompts.name,
                "prompt_sha256": prompts.sha256, "model": lm.spec.spec,
                "model_sha256": lm.sha256, "folders": folder.folders, "root": str(root)})
    return out
