"""The stored findings of one slide, read back, and ``report.json`` built from them.

Everything here reads what the stages stored (``slide.zarr`` and files in the slide's
folder); no model and no slide file is needed. The report is a plain dict with a
versioned schema (``SCHEMA``, ``SCHEMA_VERSION``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_assist.aggregate import ClassRegion, Color, TileLayout
from wsi_assist.slide import finite_float

log = logging.getLogger(__name__)

SCHEMA = "wsi-assist/report"
SCHEMA_VERSION = "1.0"
NOTICE = "Draft for research use; not a diagnosis"

#: Stages a report describes, and how to enable each when it did not run.
STAGE_HINTS = {
    "tissue": "add 'tissue' to stages",
    "tiles": "add 'tiles' to stages (after 'tissue')",
    "embed": "configure the PathCLIP weights and add 'embed' to stages",
    "zeroshot": "add 'zeroshot' to stages (needs 'embed' and a prompt set)",
    "submodels": "configure sub-model specs (ONNX + YAML) and add 'submodels' to stages",
    "caption": "configure a captioning model and add 'caption' to stages",
}
PACKAGES = ("wsi-assist", "numpy", "zarr", "shapely", "pillow", "tiffslide", "torch",
            "open_clip_torch", "transformers", "onnxruntime", "onnxruntime-gpu")


@dataclass(frozen=True)
class ZeroShot:
    """Stored zero-shot results: names, colours, probabilities (read once, float32)
    and attrs."""

    classes: list[str]
    colors: list[Color]
    probs: np.ndarray
    top: np.ndarray
    uncertain: np.ndarray | None
    attrs: dict[str, Any]

    def __post_init__(self) -> None:
        if len(self.colors) != len(self.classes):
            raise ValueError(f"colors: {len(self.colors)} for {len(self.classes)} classes")


@dataclass(frozen=True)
class SubModel:
    """One stored sub-model: its name, attrs and zarr group."""

    name: str
    attrs: dict[str, Any]
    group: zarr.Group

    @property
    def task(self) -> str:
        return str(self.attrs.get("task", "unknown"))

    def color(self, label: int) -> tuple[str, Color]:
        classes = list(self.attrs.get("classes") or [])
        colors = list(self.attrs.get("colors") or [])
        name = classes[label] if 0 <= label < len(classes) else f"{self.name} {label}"
        color = colors[label] if 0 <= label < len(colors) else (255, 200, 0)
        return name, tuple(int(c) for c in color)  # type: ignore[return-value]


def read_layout(store: zarr.Group) -> TileLayout | None:
    """The tile layout stored by the ``tiles`` stage, or None before it ran."""
    a = dict(store.attrs)
    if "coords" not in store or "read_px" not in a:
        return None
    ds = float(a["level_downsample"])
    coords = np.asarray(store["coords"][...], np.int64).reshape(-1, 2)
    return TileLayout(coords=coords, size_l0=float(a["read_px"]) * ds,
                      stride_l0=float(a["stride_px"]) * ds,
                      mpp=float(a.get("mpp") or a["slide_mpp"]))


def read_zeroshot(store: zarr.Group) -> ZeroShot | None:
    """Stored zero-shot results, or None when the stage did not run."""
    if "zeroshot" not in store or "probs" not in store["zeroshot"]:
        return None
    g = store["zeroshot"]
    a = dict(g.attrs)
    stored = np.asarray(g["probs"][...])
    top = (np.asarray(g["top"][...], np.int64) if "top" in g
           else stored.argmax(axis=1))
    probs = stored.astype(np.float32, copy=False)
    uncertain = np.asarray(g["uncertain"][...], bool) if "uncertain" in g else None
    classes = [str(c) for c in a.get("classes", [])]
    colors = [tuple(int(v) for v in c) for c in a.get("colors", [])] or \
        [_fallback_color(i) for i in range(len(classes))]
    return ZeroShot(classes=classes, colors=colors, probs=probs, top=top,  # type: ignore[arg-type]
                    uncertain=uncertain, attrs=a)


def read_submodels(store: zarr.Group) -> list[SubModel]:
    """Stored sub-models, sorted by name."""
    if "submodels" not in store:
        return []
    g = store["submodels"]
    return [SubModel(name=name, attrs=dict(sub.attrs), group=sub)
            for name, sub in sorted(g.groups())]


def read_json(path: Path, left_out_of: str = "the report") -> Any:
    """A JSON file's content, or None when absent or unreadable (logged as left out of
    ``left_out_of``)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read (%s); left out of %s", path, e, left_out_of)
        return None


def stage_status(store: zarr.Group, out_dir: Path) -> dict[str, dict[str, str]]:
    """Per stage: ``done`` or ``not run`` with the reason and how to enable it."""
    present = {
        "tissue": (out_dir / "tissue.geojson").is_file() or "tissue_area_um2" in store.attrs,
        "tiles": "coords" in store,
        "embed": "embeddings" in store,
        "zeroshot": "zeroshot" in store and "probs" in store["zeroshot"],
        "submodels": bool(read_submodels(store)),
        "caption": (out_dir / "captions.json").is_file(),
    }
    out: dict[str, dict[str, str]] = {}
    for stage, done in present.items():
        if done:
            out[stage] = {"status": "done"}
            continue
        reason = store.attrs.get(f"{stage}_skipped")
        out[stage] = {"status": "not run",
                      "reason": str(reason) if reason else "not in the run's stages",
                      "how_to_enable": str(reason) if reason else STAGE_HINTS[stage]}
    return out


def qc(store: zarr.Group, empty_below: float) -> dict[str, Any]:
    """Tissue area, tile count and the fraction of tiles mostly empty of tissue."""
    a = dict(store.attrs)
    area = a.get("tissue_area_um2")
    n = int(store["coords"].shape[0]) if "coords" in store else None
    empty = None
    if n and "tissue_fraction" in store:
        frac = np.asarray(store["tissue_fraction"][...], np.float64)
        empty = float((frac < empty_below).mean())
    return {"tissue_area_mm2": None if area is None else float(area) / 1e6,
            "n_tiles": n, "empty_tile_fraction": empty,
            "empty_tile_definition": f"tiles less than {empty_below:.0%} covered by tissue",
            "tissue_background": a.get("tissue_background")}


def composition(zs: ZeroShot | None, regions: list[ClassRegion]) -> dict[str, Any] | None:
    """Per class: tiles, area and fraction (from the zero-shot stage) and region area."""
    if zs is None:
        return None
    stored = zs.attrs.get("composition") or {}
    by_name = {r.name: r for r in regions}
    n = len(zs.top)
    rows = []
    for k, (name, color) in enumerate(zip(zs.classes, zs.colors, strict=True)):
        c = stored.get(name, {})
        r = by_name.get(name)
        n_k = int(c.get("n_tiles", int((zs.top == k).sum())))
        rows.append({"name": name, "color": list(color), "n_tiles": n_k,
                     "area_mm2": finite_float(c.get("area_mm2")),
                     "fraction": finite_float(c.get("fraction", n_k / n if n else None)),
                     "region_area_mm2": None if r is None else r.area_mm2,
                     "region_fraction": None if r is None else r.fraction})
    return {"prompt_set": zs.attrs.get("prompt_set"), "threshold": zs.attrs.get("threshold"),
            "n_uncertain": None if zs.uncertain is None else int(zs.uncertain.sum()),
            "classes": rows}


def submodel_findings(subs: list[SubModel]) -> list[dict[str, Any]]:
    """Counts and scores (with their definitions) of each sub-model."""
    out = []
    for s in subs:
        scores = {k: {"value": finite_float(v.get("value")), "definition": str(v.get("definition", ""))}
                  for k, v in (s.attrs.get("scores") or {}).items()}
        out.append({"name": s.name, "task": s.task, "classes": s.attrs.get("classes", []),
                    "colors": s.attrs.get("colors", []),
                    "counts": {k: int(v) for k, v in (s.attrs.get("counts") or {}).items()},
                    "scores": scores, "model_path": s.attrs.get("model_path"),
                    "model_sha256": s.attrs.get("model_sha256")})
    return out


def provenance(store: zarr.Group, zs: ZeroShot | None, subs: list[SubModel],
               captions: list[dict[str, Any]] | None, config_hash: str,
               seconds: dict[str, float] | None) -> dict[str, Any]:
    """Model ids and checksums, prompt set hash, config hash, package versions, times."""
    models: list[dict[str, Any]] = []
    if "embeddings" in store:
        a = store["embeddings"].attrs
        models.append({"role": "embedding", "model": a.get("model"),
                       "sha256": a.get("model_sha256")})
    if zs is not None:
        models.append({"role": "zero-shot", "model": zs.attrs.get("model"),
                       "prompt_set": zs.attrs.get("prompt_set"),
                       "prompt_sha256": zs.attrs.get("prompt_sha256")})
    for s in subs:
        models.append({"role": f"sub-model {s.name}", "model": s.attrs.get("model_path"),
                       "sha256": s.attrs.get("model_sha256")})
    cap_models = sorted({str(c.get("model")) for c in captions or [] if c.get("model")})
    for m in cap_models:
        models.append({"role": "captioner", "model": m})
    return {"models": models, "config_sha256": config_hash,
            "packages": package_versions(),
            "wsi_assist_version": store.attrs.get("wsi_assist_version"),
            "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stage_seconds": seconds}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def slide_section(store: zarr.Group, slide_id: str, info: dict[str, Any] | None
                  ) -> dict[str, Any]:
    a = dict(store.attrs)
    info = info or {}
    grid = {k: a.get(k) for k in ("level", "level_downsample", "read_px", "stride_px",
                                  "tile_px", "target_mpp", "delivered_mpp")}
    return {"slide_id": slide_id, "path": a.get("slide_path", info.get("path")),
            "mpp": finite_float(a.get("slide_mpp", info.get("mpp"))),
            "mpp_source": a.get("mpp_source", info.get("mpp_source")),
            "synthetic": bool(a.get("synthetic", info.get("synthetic", False))),
            "width": info.get("width"), "height": info.get("height"),
            "vendor": info.get("vendor"), "format": info.get("format"),
            "objective_power": info.get("objective_power"), "grid": grid}


def _fallback_color(i: int) -> Color:
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (128, 128, 0)]
    return palette[i % len(palette)]
