"""The per-slide result store: ``slide.zarr`` (zarr v3) and the files beside it.

:class:`SlideStore` has one writer and one reader per artifact; no other module indexes
the zarr group by string. Per-tile arrays are row-aligned with ``coords``.

| artifact | where |
| --- | --- |
| slide | root attrs ``slide_path``, ``slide_mpp``, ``mpp_source``, ``synthetic``, ``slide_layout``, ``slide_channels``, ... |
| tissue | ``overview``, ``tissue_mask``, root attrs ``tissue_*``; ``tissue.geojson`` |
| stains | root attr ``stain`` (kind, names, vectors, background, source, reason) |
| grid | ``coords``, ``tissue_fraction``; root attrs (level, read_px, ...) |
| thumbnail, qc | ``thumbnail``; ``tile_qc`` (N, 2: background, focus; attrs: damaged_tiles) |
| report picture | ``report_picture``: the tissue region read from the slide for the report (attrs downsample, x0, y0) |
| embeddings | ``embeddings`` (N, D) float16, attrs model, model_sha256, ... |
| zero-shot | ``zeroshot/{probs,top,uncertain}``, attrs classes, composition, ... |
| sub-models | ``submodels/<name>/<array>``, attrs task, classes, counts, scores, ... |
| nuclei | ``submodels/nuclei/{points,labels,measurements,polygons,polygon_offsets}`` |
| captions, summary | ``captions.json``, ``summary.json`` |
| segmentation | ``findings/<name>.geojson`` |
| MIL features | ``features/<model>.h5`` (TRIDENT / CLAM layout, see :func:`write_feature_file`) |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
import zarr
from shapely.geometry import shape

from wsi_assist import files, geojson
from wsi_assist.errors import WsiAssistError
from wsi_assist.slide import finite_float
from wsi_assist.stain import StainVectors
from wsi_assist.tiling import TileGrid
from wsi_assist.tissue import as_multipolygon

Color = tuple[int, int, int]

STORE_DIR = "slide.zarr"
TISSUE_FILE = "tissue.geojson"
CAPTIONS_FILE = "captions.json"
SUMMARY_FILE = "summary.json"
FINDINGS_DIR = "findings"

COORDS = "coords"
TISSUE_FRACTION = "tissue_fraction"
OVERVIEW = "overview"
TISSUE_MASK = "tissue_mask"
#: Root attribute holding the slide's :class:`StainVectors` (``StainVectors.to_json``).
STAIN = "stain"
THUMBNAIL = "thumbnail"
REPORT_PICTURE = "report_picture"
TILE_QC = "tile_qc"
#: At most this many damaged tile rows are listed in ``tile_qc`` attrs.
MAX_DAMAGED_ROWS = 1000
EMBEDDINGS = "embeddings"
FEATURES_DIR = "features"
#: HDF5 dataset names that TRIDENT and CLAM read.
H5_FEATURES = "features"
H5_COORDS = "coords"
ZEROSHOT = "zeroshot"
ZS_PROBS, ZS_TOP, ZS_UNCERTAIN = "probs", "top", "uncertain"
SUBMODELS = "submodels"
#: Arrays a sub-model group may hold.
SUB_POINTS, SUB_BOXES, SUB_LABELS, SUB_SCORES = "points", "boxes", "labels", "scores"
SUB_MEASUREMENTS, SUB_PROBS = "measurements", "probs"
#: Outlines: vertices (M, 2) level-0 x, y; object i is rows offsets[i]:offsets[i + 1].
SUB_POLYGONS, SUB_POLYGON_OFFSETS = "polygons", "polygon_offsets"

GRID_ATTRS = ("level", "level_downsample", "read_px", "stride_px", "tile_px", "target_mpp",
              "mpp", "delivered_mpp")
TISSUE_COLOR = (0, 160, 80)


@dataclass(frozen=True)
class SlideRecord:
    """What the store knows of the slide file itself."""

    path: str | None
    mpp: float | None
    mpp_source: str | None
    synthetic: bool
    fingerprint: str | None
    version: str | None
    #: ``rgb``, or ``channels`` for a multichannel (fluorescence) slide, and its channels.
    layout: str = "rgb"
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overview:
    """An RGB picture of the slide whose pixels are ``downsample`` level-0 px wide; its
    top-left pixel is level-0 ``origin`` (the whole slide: (0, 0))."""

    image: np.ndarray
    downsample: float
    origin: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or not self.downsample > 0:
            raise ValueError(f"image must be (H, W, C) and downsample > 0, got "
                             f"{self.image.shape}, {self.downsample!r}")


@dataclass(frozen=True)
class TissueRecord:
    """Stored tissue: polygons (level-0 px) and how they were found."""

    geometry: shapely.MultiPolygon
    background: str | None
    threshold: float | None
    area_um2: float | None
    method: str | None = None
    levels: dict[str, float] | None = None


@dataclass(frozen=True)
class Embeddings:
    """Tile embeddings (N, D) and the model that made them."""

    vectors: np.ndarray
    model: str
    model_sha256: str
    engine: str = "torch"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got {self.vectors.shape}")


@dataclass(frozen=True)
class ZeroShot:
    """Zero-shot results: class names and colours, probabilities (N, C) float32, the
    top class and the uncertain flag per tile, and how they were made."""

    classes: list[str]
    colors: list[Color]
    probs: np.ndarray
    top: np.ndarray
    uncertain: np.ndarray
    prompt_set: str | None = None
    prompt_sha256: str | None = None
    model: str | None = None
    threshold: float | None = None
    composition: dict[str, Any] = field(default_factory=dict)
    uncertain_summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, c = len(self.top), len(self.classes)
        if len(self.colors) != c:
            raise ValueError(f"colors: {len(self.colors)} for {c} classes")
        if self.probs.shape != (n, c) or self.uncertain.shape != (n,):
            raise ValueError(f"probs {self.probs.shape} and uncertain "
                             f"{self.uncertain.shape} must match {n} tiles, {c} classes")


@dataclass(frozen=True)
class SubmodelRecord:
    """One stored sub-model: its attributes (task, classes, colours, counts, scores,
    model path and checksum, ...) and its arrays, read lazily (chunk by chunk)."""

    name: str
    attrs: dict[str, Any]
    arrays: Mapping[str, zarr.Array]

    @property
    def task(self) -> str:
        return str(self.attrs.get("task", "unknown"))

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.attrs.get("classes") or []]

    @property
    def skipped(self) -> str | None:
        why = self.attrs.get("skipped")
        return str(why) if why else None

    @property
    def measurement_names(self) -> list[str]:
        names = self.attrs.get("measurement_names")
        if not names and SUB_MEASUREMENTS in self.arrays:
            names = self.arrays[SUB_MEASUREMENTS].attrs.get("measurement_names")
        return [str(n) for n in names or []]

    def color(self, label: int) -> tuple[str, Color]:
        """Class name and colour of a label (a fallback for labels beyond the classes)."""
        classes, colors = self.classes, list(self.attrs.get("colors") or [])
        name = classes[label] if 0 <= label < len(classes) else f"{self.name} {label}"
        rgb = colors[label] if 0 <= label < len(colors) else (255, 200, 0)
        return name, (int(rgb[0]), int(rgb[1]), int(rgb[2]))

    def read(self, key: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Array ``key`` (all of it, or the given rows)."""
        arr = self.arrays[key]
        return np.asarray(arr[...] if rows is None else arr.oindex[rows])


class SlideStore:
    """One slide's stored results in ``folder`` (``OUT/<slide-id>`` or its work copy)."""

    def __init__(self, folder: Path, mode: Literal["r", "a", "w"] = "a") -> None:
        self.folder = Path(folder)
        self.mode = mode
        try:
            self.group = zarr.open_group(str(self.folder / STORE_DIR), mode=mode,
                                         zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise WsiAssistError(f"{self.folder}: no {STORE_DIR} here; give a slide "
                                 "output folder OUT/<slide-id>") from e

    # -- generic ----------------------------------------------------------------
    def _write(self, name: str, data: np.ndarray, rows_per_chunk: int = 65536,
               group: zarr.Group | None = None, **attrs: Any) -> None:
        data = np.asarray(data)
        chunks = (max(1, min(rows_per_chunk, data.shape[0] or 1)),) + data.shape[1:]
        target = self.group if group is None else group
        arr = target.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                  overwrite=True)
        if data.size:
            arr[...] = data
        if attrs:
            arr.attrs.update(attrs)

    def _array(self, name: str) -> np.ndarray | None:
        return _read(self.group, name) if name in self.group else None

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes, as a plain dict (for provenance and debugging)."""
        return _attrs(self.group)

    # -- stage markers ---------------------------------------------------------
    def mark_skipped(self, stage: str, why: str) -> None:
        """Record that ``stage`` did not run for this slide, and why."""
        self.group.attrs[f"{stage}_skipped"] = why

    def skipped(self, stage: str) -> str | None:
        why = self.attrs.get(f"{stage}_skipped")
        return str(why) if why else None

    # -- slide -----------------------------------------------------------------
    def write_slide(self, path: Path, mpp: float | None, mpp_source: str | None,
                    synthetic: bool, fingerprint: str, version: str, layout: str = "rgb",
                    channels: tuple[str, ...] = ()) -> None:
        self.group.attrs.update({"slide_path": str(path), "slide_mpp": mpp,
                                 "mpp_source": mpp_source, "synthetic": synthetic,
                                 "slide_fingerprint": fingerprint,
                                 "wsi_assist_version": version, "slide_layout": layout,
                                 "slide_channels": list(channels)})

    def read_slide(self) -> SlideRecord:
        a = self.attrs
        return SlideRecord(path=_opt_str(a.get("slide_path")),
                           mpp=finite_float(a.get("slide_mpp", a.get("mpp"))),
                           mpp_source=_opt_str(a.get("mpp_source")),
                           synthetic=bool(a.get("synthetic", False)),
                           fingerprint=_opt_str(a.get("slide_fingerprint")),
                           version=_opt_str(a.get("wsi_assist_version")),
                           layout=str(a.get("slide_layout") or "rgb"),
                           channels=tuple(str(c) for c in a.get("slide_channels") or ()))

    def set_fingerprint(self, fingerprint: str) -> None:
        self.group.attrs["slide_fingerprint"] = fingerprint

    # -- tissue ----------------------------------------------------------------
    def write_tissue(self, overview: Overview, mask: np.ndarray,
                     geometry: shapely.MultiPolygon, background: str, threshold: float,
                     mpp: float, method: str | None = None,
                     levels: dict[str, float] | None = None) -> int:
        """The overview tissue was found on, its mask, and ``tissue.geojson`` (one QuPath
        annotation per piece, with area and perimeter in um); returns the piece count.
        ``method`` and ``levels`` record how the tissue was found."""
        ds = overview.downsample
        self._write(OVERVIEW, overview.image, rows_per_chunk=1024, downsample=ds,
                    description="RGB overview tissue was detected on")
        self._write(TISSUE_MASK, mask, rows_per_chunk=1024, downsample=ds)
        area_um2 = float(geometry.area * mpp ** 2)
        self.group.attrs.update({"tissue_background": background,
                                 "tissue_threshold": threshold, "tissue_area_um2": area_um2,
                                 "tissue_method": method, "tissue_levels": levels or {}})
        feats = (geojson.feature(
            poly, "annotation", name=f"Tissue {i + 1}", classification=("Tissue", TISSUE_COLOR),
            measurements={"Area um^2": poly.area * mpp**2, "Perimeter um": poly.length * mpp})
            for i, poly in enumerate(geometry.geoms))
        return geojson.write_features(self.folder / TISSUE_FILE, feats)

    def has_tissue(self) -> bool:
        return (self.folder / TISSUE_FILE).is_file() or "tissue_area_um2" in self.group.attrs

    def read_tissue(self) -> TissueRecord:
        """Stored tissue; empty geometry when ``tissue.geojson`` is absent."""
        a = self.attrs
        return TissueRecord(geometry=self.read_tissue_geometry(),
                            background=_opt_str(a.get("tissue_background")),
                            threshold=finite_float(a.get("tissue_threshold")),
                            area_um2=finite_float(a.get("tissue_area_um2")),
                            method=_opt_str(a.get("tissue_method")),
                            levels={str(k): float(v) for k, v in
                                    (a.get("tissue_levels") or {}).items()})

    def read_tissue_geometry(self) -> shapely.MultiPolygon:
        path = self.folder / TISSUE_FILE
        if not path.is_file():
            return shapely.MultiPolygon()
        geoms = [shape(f["geometry"]) for f in geojson.read_features(path)]
        return as_multipolygon(shapely.union_all(geoms) if geoms else shapely.MultiPolygon())

    def tissue_features(self) -> list[dict[str, Any]]:
        """The tissue annotations of ``tissue.geojson``, as stored."""
        path = self.folder / TISSUE_FILE
        return geojson.read_features(path) if path.is_file() else []

    def read_overview(self) -> Overview | None:
        if OVERVIEW not in self.group:
            return None
        arr = _array(self.group, OVERVIEW)
        return Overview(np.asarray(arr[...]), float(_attrs(arr)["downsample"]))

    # -- stains -------------------------------------------------------------------
    def write_stains(self, stains: StainVectors) -> None:
        """The slide's kind of image and stain vectors (written by the tissue stage)."""
        self.group.attrs[STAIN] = _json_safe(stains.to_json())

    def read_stains(self) -> StainVectors | None:
        """The stored stain vectors, or None before the tissue stage found them."""
        d = self.attrs.get(STAIN)
        if not isinstance(d, dict):
            return None
        try:
            return StainVectors.from_json(d)
        except ValueError as e:
            raise WsiAssistError(f"{self.folder}: {STORE_DIR} attr {STAIN!r} is not stain "
                                 f"vectors ({e}); rerun the 'tissue' stage") from e

    # -- grid, thumbnail, qc -----------------------------------------------------
    def write_grid(self, grid: TileGrid) -> None:
        self._write(COORDS, grid.coords, axes=["tile", "xy"],
                    description="level-0 x, y of each tile's top-left corner")
        self._write(TISSUE_FRACTION, grid.tissue_fraction, axes=["tile"])
        self.group.attrs.update(grid.attrs())

    def has_grid(self) -> bool:
        return COORDS in self.group

    def read_grid(self) -> TileGrid:
        """The stored TileGrid; a WsiAssistError when the ``tiles`` stage has not run."""
        a = self.attrs
        missing = [k for k in (COORDS, TISSUE_FRACTION) if k not in self.group] + \
            [k for k in GRID_ATTRS if k not in a]
        if missing:
            raise WsiAssistError(f"{self.folder}: {STORE_DIR} has no tile grid "
                                 f"({missing[0]!r} missing); run the 'tiles' stage first")
        coords = _read(self.group, COORDS).astype(np.int64).reshape(-1, 2)
        fraction = _read(self.group, TISSUE_FRACTION).astype(np.float32)
        num = {k: float(a[k]) for k in GRID_ATTRS}
        return TileGrid(coords=coords, tissue_fraction=fraction, level=int(num["level"]),
                        level_downsample=num["level_downsample"],
                        read_px=int(num["read_px"]), stride_px=int(num["stride_px"]),
                        tile_px=int(num["tile_px"]), target_mpp=num["target_mpp"],
                        mpp=num["mpp"], delivered_mpp=num["delivered_mpp"])

    def write_thumbnail(self, image: np.ndarray, downsample: float) -> None:
        self._write(THUMBNAIL, image, rows_per_chunk=1024, downsample=downsample,
                    description="RGB thumbnail, pixels are `downsample` level-0 px wide")

    def read_thumbnail(self) -> Overview | None:
        """The stored RGB thumbnail (the ``tiles`` stage), as an Overview; None before."""
        if THUMBNAIL not in self.group:
            return None
        arr = _array(self.group, THUMBNAIL)
        return Overview(np.asarray(arr[...]), float(_attrs(arr)["downsample"]))

    def write_report_picture(self, picture: Overview) -> None:
        """The report's picture of the slide (a region read at the page's resolution)."""
        self._write(REPORT_PICTURE, picture.image, rows_per_chunk=1024,
                    downsample=float(picture.downsample), x0=float(picture.origin[0]),
                    y0=float(picture.origin[1]),
                    description="RGB picture of the tissue region for the report; pixels "
                                "are `downsample` level-0 px wide, the first is at (x0, y0)")

    def read_report_picture(self) -> Overview | None:
        """The stored report picture (the ``report`` stage, with the slide); None before."""
        if REPORT_PICTURE not in self.group:
            return None
        arr = _array(self.group, REPORT_PICTURE)
        a = _attrs(arr)
        return Overview(np.asarray(arr[...]), float(a["downsample"]),
                        (float(a["x0"]), float(a["y0"])))

    def write_qc(self, scores: np.ndarray, names: list[str], description: str,
                 damaged: np.ndarray | None = None) -> None:
        """Per-tile quality scores (N, len(names)) float32; ``damaged``: grid rows of
        tiles made from damaged but decodable compressed data (attrs ``damaged_tiles``,
        the count, and ``damaged_rows``, the first :data:`MAX_DAMAGED_ROWS`)."""
        rows = [] if damaged is None else [int(r) for r in damaged]
        self._write(TILE_QC, np.asarray(scores, np.float32), axes=["tile", "score"],
                    scores=names, description=description, damaged_tiles=len(rows),
                    damaged_rows=rows[:MAX_DAMAGED_ROWS])

    def read_damaged_tiles(self) -> int | None:
        """How many tiles hold damaged compressed data (None: not recorded)."""
        if TILE_QC not in self.group:
            return None
        n = _attrs(_array(self.group, TILE_QC)).get("damaged_tiles")
        return int(n) if isinstance(n, int | float) else None

    def read_qc(self) -> dict[str, np.ndarray] | None:
        """Quality scores by name, or None before the ``tiles`` stage ran."""
        if TILE_QC not in self.group:
            return None
        arr = _array(self.group, TILE_QC)
        values = np.asarray(arr[...])
        names = [str(n) for n in _attrs(arr).get("scores", [])]
        return {n: values[:, i] for i, n in enumerate(names)}

    # -- embeddings --------------------------------------------------------------
    def write_embeddings(self, emb: Embeddings) -> None:
        self._write(EMBEDDINGS, emb.vectors, model=emb.model, model_sha256=emb.model_sha256,
                    engine=emb.engine, precision=emb.precision, axes=["tile", "feature"])

    def has_embeddings(self) -> bool:
        return EMBEDDINGS in self.group

    def read_embeddings(self, rows: np.ndarray | None = None) -> Embeddings | None:
        """The embeddings (all rows, or ``rows``), or None before ``embed`` ran."""
        if EMBEDDINGS not in self.group:
            return None
        arr = _array(self.group, EMBEDDINGS)
        a = _attrs(arr)
        vectors = np.asarray(arr[...] if rows is None else arr.oindex[rows])
        return Embeddings(vectors=vectors,
                          model=str(a.get("model", "")),
                          model_sha256=str(a.get("model_sha256", "")),
                          engine=str(a.get("engine", "torch")),
                          precision=str(a.get("precision", "fp32")))

    def read_embedding_model(self) -> Embeddings | None:
        """What made the embeddings (no vectors read), or None before ``embed`` ran."""
        return self.read_embeddings(rows=np.zeros(0, np.int64))

    def features_path(self, model_name: str) -> Path:
        """``features/<model>.h5`` beside the store."""
        return self.folder / FEATURES_DIR / f"{model_name}.h5"

    # -- zero-shot -----------------------------------------------------------------
    def write_zeroshot(self, zs: ZeroShot) -> None:
        g = self.group.require_group(ZEROSHOT)
        self._write(ZS_PROBS, zs.probs, group=g, axes=["tile", "class"])
        self._write(ZS_TOP, zs.top, group=g, axes=["tile"])
        self._write(ZS_UNCERTAIN, zs.uncertain, group=g, axes=["tile"])
        g.attrs.update(_json_safe({
            "classes": zs.classes, "colors": [list(c) for c in zs.colors],
            "prompt_set": zs.prompt_set, "prompt_sha256": zs.prompt_sha256,
            "model": zs.model, "threshold": zs.threshold, "composition": zs.composition,
            "uncertain": zs.uncertain_summary}))

    def has_zeroshot(self) -> bool:
        return ZEROSHOT in self.group and ZS_PROBS in _group(self.group, ZEROSHOT)

    def read_zeroshot(self) -> ZeroShot | None:
        """Stored zero-shot results, or None when the stage did not run."""
        if not self.has_zeroshot():
            return None
        g = _group(self.group, ZEROSHOT)
        a = _attrs(g)
        probs = _read(g, ZS_PROBS).astype(np.float32, copy=False)
        top = _read(g, ZS_TOP) if ZS_TOP in g else probs.argmax(axis=1)
        uncertain = (_read(g, ZS_UNCERTAIN).astype(bool) if ZS_UNCERTAIN in g
                     else np.zeros(len(top), bool))
        classes = [str(c) for c in a.get("classes", [])]
        colors = [(int(c[0]), int(c[1]), int(c[2])) for c in a.get("colors", [])] \
            or [fallback_color(i) for i in range(len(classes))]
        return ZeroShot(classes=classes, colors=colors, probs=probs, top=top,
                        uncertain=uncertain, prompt_set=_opt_str(a.get("prompt_set")),
                        prompt_sha256=_opt_str(a.get("prompt_sha256")),
                        model=_opt_str(a.get("model")),
                        threshold=finite_float(a.get("threshold")),
                        composition=dict(a.get("composition") or {}),
                        uncertain_summary=dict(a.get("uncertain") or {}))

    # -- sub-models ------------------------------------------------------------------
    def write_submodel(self, name: str, arrays: Mapping[str, np.ndarray],
                       attrs: Mapping[str, Any],
                       array_attrs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Replace sub-model ``name``'s group with ``arrays`` and ``attrs``."""
        root = self.group.require_group(SUBMODELS)
        if name in root:
            del root[name]
        g = root.create_group(name)
        for key, arr in arrays.items():
            self._write(key, arr, group=g, **dict((array_attrs or {}).get(key, {})))
        g.attrs.update(_json_safe(dict(attrs)))

    def read_submodels(self) -> list[SubmodelRecord]:
        """Stored sub-models, sorted by name."""
        if SUBMODELS not in self.group:
            return []
        return [SubmodelRecord(name=name, attrs=_attrs(g), arrays=dict(g.arrays()))
                for name, g in sorted(_group(self.group, SUBMODELS).groups())]

    def read_submodel(self, name: str) -> SubmodelRecord:
        """Stored sub-model ``name``; KeyError naming the stored ones when absent."""
        subs = {s.name: s for s in self.read_submodels()}
        if name not in subs:
            raise KeyError(f"no sub-model {name!r} stored; stored: {sorted(subs)}")
        return subs[name]

    def findings_path(self, name: str) -> Path:
        """``findings/<name>.geojson``: a segmentation sub-model's polygons."""
        return self.folder / FINDINGS_DIR / f"{name}.geojson"

    def findings_files(self) -> list[Path]:
        folder = self.folder / FINDINGS_DIR
        return sorted(folder.glob("*.geojson")) if folder.is_dir() else []

    # -- captions and summary ---------------------------------------------------------
    def write_captions(self, records: list[dict[str, Any]]) -> None:
        files.write_json(self.folder / CAPTIONS_FILE, records)

    def read_captions(self) -> list[dict[str, Any]] | None:
        data = files.read_json(self.folder / CAPTIONS_FILE, left_out_of="the report")
        return data if isinstance(data, list) else None

    def has_captions(self) -> bool:
        return (self.folder / CAPTIONS_FILE).is_file()

    def write_summary(self, doc: dict[str, Any]) -> None:
        files.write_json(self.folder / SUMMARY_FILE, doc)

    def read_summary(self) -> dict[str, Any] | None:
        data = files.read_json(self.folder / SUMMARY_FILE, left_out_of="the report")
        return data if isinstance(data, dict) else None


def fallback_color(i: int) -> Color:
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (128, 128, 0)]
    return palette[i % len(palette)]


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise WsiAssistError(f"{group.store_path}/{name}: expected an array, found a group")
    return node


def _group(group: zarr.Group, name: str) -> zarr.Group:
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise WsiAssistError(f"{group.store_path}/{name}: expected a group, found an array")
    return node


def _read(group: zarr.Group, name: str) -> np.ndarray:
    return np.asarray(_array(group, name)[...])


def _attrs(node: zarr.Array | zarr.Group) -> dict[str, Any]:
    """Attributes as a plain dict of JSON values (checked where they are used)."""
    return dict(node.attrs)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Attributes as plain JSON (numpy scalars and tuples converted)."""
    return dict(json.loads(json.dumps(d, default=_plain)))


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


@dataclass(frozen=True)
class FeatureFile:
    """One slide's features from one model, for MIL training: (N, D) float32 rows aligned
    with the grid's coords; ``encoder`` the model spec; ``l2_normalised`` whether the rows
    are unit vectors (the model's own output is written as it came, unnormalised)."""

    features: np.ndarray
    slide_name: str
    encoder: str
    model_sha256: str
    l2_normalised: bool
    level0_size: tuple[int, int]


def write_feature_file(path: Path, ff: FeatureFile, grid: TileGrid) -> Path:
    """Write ``ff`` to ``path`` atomically as HDF5 in the layout TRIDENT and CLAM read:
    ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 x, y of each tile's
    top-left corner. ``coords`` attrs as TRIDENT writes them (``patch_size`` in the
    delivered pixels the encoder saw, ``patch_size_level0``, ``level0_magnification`` and
    ``target_magnification`` as 10 / mpp, ``overlap``, ``name``, ``level0_width``,
    ``level0_height``) plus CLAM's ``patch_level`` (the pyramid level read) and
    ``downsample``; ``features`` attrs ``name``, ``encoder``, ``model_sha256``,
    ``l2_normalised``."""
    import h5py

    feats = np.ascontiguousarray(ff.features, dtype=np.float32)
    if feats.ndim != 2 or len(feats) != len(grid):
        raise WsiAssistError(f"{path}: features {feats.shape} do not match the grid's "
                             f"{len(grid)} tiles")
    overlap = max(0, round((grid.read_px - grid.stride_px) * grid.tile_px / grid.read_px))
    coords_attrs: dict[str, Any] = {
        "patch_size": int(grid.tile_px),
        "patch_size_level0": round(grid.size_l0),
        "level0_magnification": 10.0 / grid.mpp,
        "target_magnification": 10.0 / grid.delivered_mpp,
        "overlap": int(overlap),
        "name": ff.slide_name,
        "level0_width": int(ff.level0_size[0]),
        "level0_height": int(ff.level0_size[1]),
        "patch_level": int(grid.level),
        "downsample": np.array([grid.level_downsample] * 2, np.float64),
        "mpp": float(grid.mpp),
        "target_mpp": float(grid.target_mpp),
    }
    feat_attrs: dict[str, Any] = {"name": ff.slide_name, "encoder": ff.encoder,
                                  "model_sha256": ff.model_sha256,
                                  "l2_normalised": bool(ff.l2_normalised)}
    with files.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset(H5_FEATURES, data=feats)
        d.attrs.update(feat_attrs)
        c = f.create_dataset(H5_COORDS, data=np.asarray(grid.coords, np.int64))
        c.attrs.update(coords_attrs)
    return path
