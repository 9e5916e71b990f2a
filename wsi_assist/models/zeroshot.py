"""Zero-shot tissue classes from tile embeddings and a prompt set.

A prompt set (``configs/prompts/*.yaml``) lists classes; each class has a colour and
either explicit ``prompts`` or ``names`` put into the set's ``templates`` (both may be
given). A class's text embedding is the renormalised mean of its prompts' embeddings
(CLIP prompt ensembling); probabilities are ``softmax(logit_scale * cosine)``. Text
embeddings are cached on disk per (model SHA-256, prompt-set SHA-256) in the folder
given (the batch: ``zeroshot.cache_dir``, else ``OUT/.cache/text-embeddings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import ConfigError, ModelError
from wsi_assist.files import atomic_path, configs_dir, read_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptClass:
    """One class: its name, colour, the prompts that describe it, folder aliases."""

    name: str
    color: tuple[int, int, int]
    prompts: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be non-empty")
        if len(self.color) != 3 or not all(0 <= c <= 255 for c in self.color):
            raise ValueError(f"color of {self.name!r} must be [r, g, b] in 0..255, "
                             f"got {self.color!r}")
        if not self.prompts:
            raise ValueError(f"prompts of {self.name!r}: none given")


#: How ``eval zeroshot`` reads a benchmark's released files (see models/datasets.py).
LAYOUTS = ("folders", "pcam_h5", "wsss4luad", "sicapv2", "skin_csv", "osteo")


@dataclass(frozen=True)
class PromptSet:
    """Classes in order; ``sha256`` identifies the exact prompts. ``layout`` names how
    ``eval zeroshot`` reads the benchmark's released files, ``source`` where the
    prompts come from (a published protocol, or this project)."""

    name: str
    classes: tuple[PromptClass, ...]
    layout: str = "folders"
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"classes of {self.name!r}: need at least 2")
        names = [c.name.casefold() for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"classes of {self.name!r}: duplicate class names")
        if self.layout not in LAYOUTS:
            raise ValueError(f"dataset.layout {self.layout!r} is not one of "
                             f"{', '.join(LAYOUTS)}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[list[int]]:
        return [list(c.color) for c in self.classes]

    @property
    def sha256(self) -> str:
        blob = json.dumps([[c.name, list(c.prompts)] for c in self.classes])
        return hashlib.sha256(blob.encode()).hexdigest()

    def class_index(self, label: str) -> int | None:
        """The class whose name or alias equals ``label`` (case-insensitive)."""
        key = label.casefold()
        for i, c in enumerate(self.classes):
            if key == c.name.casefold() or key in (a.casefold() for a in c.aliases):
                return i
        return None


def prompts_dir() -> Path:
    """The shipped prompt sets, next to ``configs/default.yaml``."""
    return configs_dir() / "prompts"


def shipped_prompt_sets() -> list[str]:
    return sorted(p.stem for p in prompts_dir().glob("*.yaml"))


def resolve_prompts(ref: str) -> Path:
    """A shipped set's name (``crc100k``) or a path to a YAML file."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref:
        return Path(ref).expanduser()
    path = prompts_dir() / f"{ref}.yaml"
    if not path.is_file():
        raise ConfigError(f"zeroshot.prompts: no prompt set {ref!r}; shipped: "
                          f"{', '.join(shipped_prompt_sets())} (or give a YAML path)")
    return path


def load_prompt_set(ref: str | Path) -> PromptSet:
    """Read and validate a prompt-set YAML; errors name the file and the class."""
    path = resolve_prompts(str(ref))
    data = read_yaml(path, "prompt set", ConfigError)
    try:
        return _parse_prompt_set(data, path.stem)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: {e}") from e


def _parse_prompt_set(data: Any, default_name: str) -> PromptSet:
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise ValueError("a prompt set needs a 'classes' list")
    templates = data.get("templates") or []
    if not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("templates must be strings containing '{}'")
    classes = []
    for i, c in enumerate(data["classes"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ValueError(f"classes[{i}]: needs a 'name'")
        names = [str(n) for n in c.get("names") or []]
        if names and not templates:
            raise ValueError(f"class {c['name']!r}: 'names' given but the set has no templates")
        prompts = [str(p) for p in c.get("prompts") or []]
        prompts += [t.format(n) for n in names for t in templates]
        color = c.get("color")
        if not isinstance(color, list | tuple) or len(color) != 3:
            raise ValueError(f"class {c['name']!r}: color must be [r, g, b], got {color!r}")
        rgb = (int(color[0]), int(color[1]), int(color[2]))
        classes.append(PromptClass(name=c["name"], color=rgb,
                                   prompts=tuple(prompts),
                                   aliases=tuple(str(a) for a in c.get("aliases") or [])))
    dataset = data.get("dataset") or {}
    if not isinstance(dataset, dict):
        raise TypeError("'dataset' must be a mapping such as {layout: folders}")
    return PromptSet(name=str(data.get("name") or default_name), classes=tuple(classes),
                     layout=str(dataset.get("layout") or "folders"),
                     source=str(data.get("source") or ""))


@dataclass(frozen=True)
class TextEmbeddings:
    """One unit vector per class and the model's logit scale."""

    classes: np.ndarray
    logit_scale: float


def cache_dir(configured: str | Path | None = None) -> Path | None:
    """Where text embeddings are cached: the folder given, else nowhere (the batch gives
    ``OUT/.cache/text-embeddings``; nothing is written outside OUT unless asked)."""
    return Path(configured).expanduser() if configured else None


def cache_path(model_sha256: str, prompts: PromptSet, directory: Path) -> Path:
    return directory / f"{model_sha256[:16]}-{prompts.sha256[:16]}.npz"


def class_embeddings(text_emb: np.ndarray, counts: list[int]) -> np.ndarray:
    """Mean of each class's consecutive prompt embeddings, renormalised."""
    out, start = [], 0
    for n in counts:
        v = text_emb[start:start + n].mean(axis=0)
        out.append(v / max(float(np.linalg.norm(v)), 1e-12))
        start += n
    return np.stack(out).astype(np.float32)


def text_embeddings(model: Any, prompts: PromptSet, *, cache: str | Path | None = None,
                    model_sha256: str | None = None, device: str = "cpu") -> TextEmbeddings:
    """Class embeddings for ``prompts``, from the cache when the model's SHA is known.

    ``model`` is a spec (str / ModelSpec) or a LoadedModel; it is only loaded on a miss.
    """
    from wsi_assist.models import pathclip

    directory = cache_dir(cache)
    if model_sha256 is not None and directory is not None:
        hit = _read_cache(cache_path(model_sha256, prompts, directory))
        if hit is not None:
            return hit
    lm = pathclip.load_model(model, device)
    if model_sha256 is not None and lm.sha256 != model_sha256:
        raise ModelError(f"{lm.spec.spec}: weights {lm.sha256[:12]} differ from those the "
                         f"embeddings were made with ({model_sha256[:12]}); rerun 'embed'")
    texts = [p for c in prompts.classes for p in c.prompts]
    emb = pathclip.encode_text(lm, texts)
    result = TextEmbeddings(class_embeddings(emb, [len(c.prompts) for c in prompts.classes]),
                            lm.logit_scale)
    if directory is not None:
        _write_cache(cache_path(lm.sha256, prompts, directory), result)
    return result


def _read_cache(path: Path) -> TextEmbeddings | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return TextEmbeddings(np.asarray(z["classes"], np.float32), float(z["logit_scale"]))
    except (OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable text-embedding cache %s: %s", path, e)
        return None


def _write_cache(path: Path, emb: TextEmbeddings) -> None:
    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, classes=emb.classes, logit_scale=np.float64(emb.logit_scale))
    except OSError as e:
        log.warning("cannot cache text embeddings at %s: %s", path, e)


def classify(image_emb: np.ndarray, text: TextEmbeddings) -> np.ndarray:
    """(N, D) image embeddings -> (N, C) float32 softmax(logit_scale * cosine)."""
    x = np.asarray(image_emb, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    logits = text.logit_scale * (x @ text.classes.T)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def composition(top: np.ndarray, uncertain: np.ndarray, tissue_fraction: np.ndarray,
                tile_area_mm2: float, names: list[str]) -> tuple[dict, dict]:
    """Per class (confident tiles only) and for uncertain tiles: n_tiles, area_mm2
    (tissue_fraction x tile area) and fraction of the tiled tissue area."""
    area = np.asarray(tissue_fraction, np.float64) * tile_area_mm2
    total = float(area.sum())

    def entry(mask: np.ndarray) -> dict[str, float | int]:
        a = float(area[mask].sum())
        return {"n_tiles": int(mask.sum()), "area_mm2": a,
                "fraction": a / total if total > 0 else 0.0}

    per_class = {n: entry((top == i) & ~uncertain) for i, n in enumerate(names)}
    return per_class, entry(uncertain)
