"""Every config section as a frozen pydantic model, and the whole ``Config``.

A leaf module: it imports nothing of the package, so any module may import it. Pydantic
v2 validates types strictly (``"0.5"`` is not a float, ``1`` is not a bool; ints pass as
floats and YAML lists as tuples) and reports each error with its location, which
:func:`describe_error` turns into one line naming the key and the allowed values.
Constructing a section directly raises :class:`SettingsError` (a ``ValueError``) whose
message starts with the field name, e.g. ``tile_px must be >= 8, got 4``.

The key names and defaults are the interface of ``configs/default.yaml``; the tests
check that file against the defaults here.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

#: The captioner's default prompt; ``{findings}`` is replaced by the tile's findings.
DEFAULT_CAPTION_PROMPT = (
    "You are assisting a pathologist. This is an H&E-stained tile from a whole-slide image."
    "\nFindings from analysis tools for this tile:\n{findings}\n"
    "Describe the tissue and cells you see in one or two sentences, noting whether the "
    "image supports the tool findings. Be concise and do not give a diagnosis.")
#: The built-in analysis in ``submodels.specs``: QuPath-style positive cell detection
#: (:mod:`wsi_assist.nuclei`, settings in the ``nuclei`` section), which needs no weights.
BUILTIN_NUCLEI = "nuclei"
#: Former name of the built-in (an ONNX model until 0.1), still accepted in ``specs``.
LEGACY_NUCLEI = "nuclei-stain.yaml"
#: Short onnxruntime provider names accepted in ``submodels.providers``.
Provider = Literal["tensorrt", "cuda", "cpu"]


class SettingsError(ValueError):
    """A section built directly with a bad value; the message names the field. Keeps
    pydantic's error details, so a section nested in a Config reports its full path."""

    def __init__(self, model: type[BaseModel], details: list[ErrorDetails]) -> None:
        super().__init__(describe_error(model, details[0]))
        self.model, self.details = model, details


def _as_tuple(value: Any) -> Any:
    """YAML has lists where the settings hold tuples."""
    return tuple(value) if isinstance(value, list) else value


T = typing.TypeVar("T")
Tuple = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]
RGB = Annotated[tuple[int, int, int], BeforeValidator(_as_tuple)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    """Base of all sections: frozen, strict types, unknown keys refused."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise SettingsError(type(self), e.errors()) from None


class MppParams(Section):
    """Resolution overrides for slides that carry none (``mpp``)."""

    override: Annotated[float, Field(gt=0)] | None = None
    csv: str | None = None


class TissueParams(Section):
    """Tissue detection (``tissue``); the method is described in ``wsi_assist/tissue.py``."""

    background: Literal["auto", "bright", "dark"] = "auto"
    overview_mpp: NonNegFloat = 8.0
    overview_min_px: PosInt = 1000
    overview_max_pixels: PosInt = 16_000_000
    blur_um: NonNegFloat = 1.0
    od_floor: NonNegFloat = 0.03
    od_ceiling: NonNegFloat = 0.05
    dark_floor: Fraction = 0.02
    dark_ceiling: Fraction = 0.05
    dark_close_um: NonNegFloat = 25.0
    min_area_um2: NonNegFloat = 20_000.0
    min_hole_um2: NonNegFloat = 5_000.0
    smoothing_um: NonNegFloat = 16.0
    simplify_um: NonNegFloat = 1.0

    @model_validator(mode="after")
    def _floors_below_ceilings(self) -> TissueParams:
        for lo, hi in (("od_floor", "od_ceiling"), ("dark_floor", "dark_ceiling")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} must be <= {hi}, got {getattr(self, lo)!r} > "
                                 f"{getattr(self, hi)!r}")
        return self


def _triple(low: float, high: float, what: str, low_open: bool = False) -> Any:
    """A BeforeValidator: three numbers within [low, high] (low excluded when ``low_open``)."""
    def check(value: Any) -> Any:
        if value is None:
            return value
        ok = (isinstance(value, list | tuple) and len(value) == 3
              and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))
        if ok:
            ok = all((v > low if low_open else v >= low) and v <= high for v in value)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ValueError(f"must be {what} [r, g, b], three numbers in {interval}, "
                             f"got {value!r}")
        return tuple(float(v) for v in value)
    return BeforeValidator(check)


#: A stain's optical-density direction (red, green, blue); scaled to unit length when used.
ODVector = Annotated[tuple[float, float, float], _triple(0, 10, "an OD vector")]
#: A background (white) value per channel, as in 8-bit RGB.
WhiteRGB = Annotated[tuple[float, float, float], _triple(0, 255, "a background", True)]


class StainParams(Section):
    """The kind of image and its stain vectors (``stain``), found by the tissue stage."""

    kind: Literal["auto", "brightfield-he", "brightfield-hdab", "brightfield-other",
                  "fluorescence"] = "auto"
    vectors: Literal["auto", "default", "config"] = "auto"
    hematoxylin: ODVector | None = None
    eosin: ODVector | None = None
    dab: ODVector | None = None
    background: WhiteRGB | None = None

    @model_validator(mode="after")
    def _config_vectors(self) -> StainParams:
        given = [k for k in ("hematoxylin", "eosin", "dab") if getattr(self, k) is not None]
        if self.vectors != "config":
            if given:
                raise ValueError(f"{given[0]} is used only with vectors: config, got "
                                 f"vectors {self.vectors!r}")
            return self
        if self.hematoxylin is None or (self.eosin is None) == (self.dab is None):
            raise ValueError("vectors: config needs hematoxylin and one of eosin or dab")
        for k in given:
            if not sum(getattr(self, k)) > 0:
                raise ValueError(f"{k} must not be all zero")
        (a, b, c), (x, y, z) = self.hematoxylin, getattr(self, given[1])
        cross = ((b * z - c * y) ** 2 + (c * x - a * z) ** 2 + (a * y - b * x) ** 2) ** 0.5
        if cross < 0.02 * (a * a + b * b + c * c) ** 0.5 * (x * x + y * y + z * z) ** 0.5:
            raise ValueError(f"hematoxylin and {given[1]} must point in different directions")
        if self.kind == "fluorescence" or (self.kind, given[1]) in (
                ("brightfield-he", "dab"), ("brightfield-hdab", "eosin")):
            raise ValueError(f"{given[1]} does not fit kind {self.kind!r}")
        return self


def _channel_spec(value: Any) -> Any:
    """``auto``, a channel name or a 0-based index; anything else is refused here, so
    the error names the choices rather than each member of the union."""
    ok = (isinstance(value, str) and value.strip()) or (
        isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    if not ok:
        raise ValueError(f"nuclear must be auto, a channel name or a 0-based channel "
                         f"index, got {value!r}")
    return value


class ChannelParams(Section):
    """Multichannel (fluorescence, CYX) slides (``channels``); RGB slides ignore it."""

    nuclear: Annotated[str | int, BeforeValidator(_channel_spec)] = "auto"
    percentiles: Annotated[tuple[float, float], BeforeValidator(_as_tuple)] = (1.0, 99.5)

    @field_validator("percentiles")
    @classmethod
    def _percentiles_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must be [low, high] with 0 <= low < high <= "
                             f"100, got {list(v)!r}")
        return v


class TilingParams(Section):
    """The tile grid (``tiling``)."""

    target_mpp: Annotated[float, Field(gt=0)] = 0.5
    tile_px: Annotated[int, Field(ge=8)] = 224
    overlap_px: NonNegInt = 0
    min_tissue: Fraction = 0.25
    mpp_tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.05

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingParams:
        if self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px must be in [0, tile_px), got {self.overlap_px!r}")
        return self


class StreamParams(Section):
    """How tiles are read (``stream``); results do not depend on these."""

    batch_size: PosInt = 64
    prefetch: PosInt = 4
    threads: Annotated[int, Field(ge=0, description="0 = all cores")] = 0


class OutputParams(Section):
    """What is written besides the zarr store (``outputs``)."""

    thumbnail_px: Annotated[int, Field(ge=64)] = 1024
    draw_tiles: bool = True


class ParallelParams(Section):
    """Where slides run (``parallelism``)."""

    workers: PosInt = 1
    scheduler: str | None = None
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class CaptionParams(Section):
    """Captions and the slide summary (``caption``)."""

    model: str | None = None
    prompt: str = DEFAULT_CAPTION_PROMPT
    max_new_tokens: PosInt = 96
    batch_size: PosInt = 4
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    top_k: NonNegInt = 3
    pool: PosInt = 32
    fallback_k: NonNegInt = 8
    queries: Tuple[str] = ()
    query_k: NonNegInt = 3
    query_model: str | None = None
    summary_model: str | None = None
    summary_max_new_tokens: PosInt = 256

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("queries")
    @classmethod
    def _queries_not_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not q.strip() for q in v):
            raise ValueError(f"queries must be non-empty texts, got {v!r}")
        return v


class EmbedParams(Section):
    """Tile embeddings (``embed``)."""

    model: str = "pathclip"
    pathclip: str | None = None
    engine: Literal["torch", "onnx"] = "torch"
    onnx: str | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: PosInt | None = None
    #: Also write ``OUT/<slide>/features/<model>.h5`` (TRIDENT / CLAM layout) for MIL.
    features_h5: bool = True

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must be a model spec such as 'pathclip', got ''")
        return v


class ZeroShotParams(Section):
    """Zero-shot classification (``zeroshot``)."""

    prompts: str = "crc100k"
    threshold: Fraction = 0.5
    cache_dir: str | None = None

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompts must name a prompt set or a YAML file, got ''")
        return v


class SubmodelParams(Section):
    """Which sub-models run and where (``submodels``)."""

    specs: Tuple[str] = (BUILTIN_NUCLEI,)
    providers: Annotated[Tuple[Provider], Field(min_length=1)] | None = None
    mpp_tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.25


#: Images nuclei are detected on, as QuPath's ``detectionImageBrightfield`` names them;
#: ``auto``: the optical-density sum on H-DAB slides, haematoxylin elsewhere.
DetectionImage = Literal["auto", "Optical density sum", "Hematoxylin OD"]
#: Nucleus measurements positivity may be scored on (QuPath's ``thresholdCompartment``).
ScoreCompartment = Literal["Nucleus: DAB OD mean", "Nucleus: DAB OD max"]
Micrometres = Annotated[float, Field(ge=0)]


class NucleiParams(Section):
    """The built-in nucleus detection and positivity (``nuclei``). Keys carry the names
    of QuPath's "Positive cell detection" parameters, with its defaults."""

    stains: Literal["auto", "brightfield-he", "brightfield-hdab"] = "auto"
    detectionImageBrightfield: DetectionImage = "auto"
    requestedPixelSizeMicrons: Annotated[float, Field(gt=0)] = 0.5
    backgroundRadiusMicrons: Micrometres = 8.0
    backgroundByReconstruction: bool = True
    medianRadiusMicrons: Micrometres = 0.0
    sigmaMicrons: Annotated[float, Field(gt=0)] = 1.5
    minAreaMicrons: Micrometres = 10.0
    maxAreaMicrons: Annotated[float, Field(gt=0)] = 400.0
    threshold: float = 0.1
    maxBackground: float = 2.0
    watershedPostProcess: bool = True
    excludeDAB: bool = False
    smoothBoundaries: bool = True
    thresholdCompartment: ScoreCompartment = "Nucleus: DAB OD mean"
    thresholdPositive1: NonNegFloat = 0.2
    thresholdPositive2: NonNegFloat = 0.4
    thresholdPositive3: NonNegFloat = 0.6
    singleThreshold: bool = True
    haloMicrons: Annotated[float, Field(gt=0)] = 20.0
    analysisTileMicrons: Annotated[float, Field(gt=0)] = 512.0
    #: Nucleus-vs-stroma/ink rejection (ours; QuPath has no such step), on H&E and other
    #: brightfield slides with a full-strength haematoxylin (not H-DAB, whose counterstain
    #: is light by design): the mean haematoxylin OD of a nucleus must exceed that of a ring
    #: ``contrastRingMicrons`` wide around it by ``minNucleusContrast``; its mean OD must
    #: lie within ``maxStainAngle`` degrees of a non-negative mix of the slide's two stains
    #: (marking ink, pigment). ``minSolidity`` (area / convex hull area) applies on every
    #: slide. 0 turns each off.
    minNucleusContrast: NonNegFloat = 0.3
    contrastRingMicrons: Annotated[float, Field(gt=0)] = 1.5
    maxStainAngle: NonNegFloat = 5.0
    minSolidity: Fraction = 0.0
    #: mpp plausibility (ours): nuclei per mm^2 of analysed tissue outside this range make
    #: the manifest and the report warn that the slide's mpp may be wrong (see README).
    minPlausibleDensity: NonNegFloat = 300.0
    maxPlausibleDensity: NonNegFloat = 60_000.0
    #: Blocks analysed at once, each in a thread of its own (scipy and scikit-image
    #: release the GIL in their filters and floods); 0: one per CPU core, at most 4.
    workers: NonNegInt = 0
    #: Fluorescence (ours, see wsi_assist.nuclei_fluorescence): QuPath's ``threshold`` on
    #: the nuclear channel, an intensity above the local background in the slide's units;
    #: unset, ``fluorescenceThresholdFraction`` of the nuclear channel's spread (99.5th -
    #: 1st percentile) over the slide's tissue.
    fluorescenceThreshold: NonNegFloat | None = None
    fluorescenceThresholdFraction: Fraction = 0.1

    @model_validator(mode="after")
    def _ordered(self) -> NucleiParams:
        if self.minAreaMicrons >= self.maxAreaMicrons:
            raise ValueError(f"minAreaMicrons must be < maxAreaMicrons, got "
                             f"{self.minAreaMicrons!r} >= {self.maxAreaMicrons!r}")
        t = (self.thresholdPositive1, self.thresholdPositive2, self.thresholdPositive3)
        if not self.singleThreshold and not t[0] <= t[1] <= t[2]:
            raise ValueError(f"thresholdPositive1 <= thresholdPositive2 <= "
                             f"thresholdPositive3 required, got {t!r}")
        return self

    def qupath(self) -> dict[str, Any]:
        """The parameters QuPath's "Positive cell detection" takes, by its names (what a
        report prints next to the scores)."""
        return {k: v for k, v in self.model_dump().items()
                if k not in ("stains", "haloMicrons", "analysisTileMicrons", "workers",
                             "fluorescenceThreshold", "fluorescenceThresholdFraction")}



class ReportParams(Section):
    """What annotations and reports contain (``report``)."""

    include_tiles: bool = False
    min_region_um2: NonNegFloat = 50_000.0
    exclude_uncertain: bool = True
    heatmap_classes: Tuple[str] | None = None
    max_heatmaps: NonNegInt = 6
    image_px: Annotated[int, Field(ge=128)] = 900
    #: long side of the slide picture read from the slide file for the report (the
    #: tissue region, from the nearest pyramid level): sharp on the printed page
    picture_px: Annotated[int, Field(ge=256, le=8192)] = 1600
    gallery_per_class: NonNegInt = 2
    empty_tile_tissue: Fraction = 0.5
    pdf: bool = True


class Config(BaseModel):
    """The effective configuration: the stages to run and one model per section.

    Stage names are checked against the stage registry by :mod:`wsi_assist.config`,
    which builds every Config read from files or flags.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    #: Names from the stage registry; :func:`wsi_assist.config.from_dict` fills in every
    #: registered stage when none are given.
    stages: Tuple[str] = ()
    mpp: MppParams = MppParams()
    tissue: TissueParams = TissueParams()
    stain: StainParams = StainParams()
    channels: ChannelParams = ChannelParams()
    tiling: TilingParams = TilingParams()
    stream: StreamParams = StreamParams()
    outputs: OutputParams = OutputParams()
    parallelism: ParallelParams = ParallelParams()
    caption: CaptionParams = CaptionParams()
    embed: EmbedParams = EmbedParams()
    zeroshot: ZeroShotParams = ZeroShotParams()
    report: ReportParams = ReportParams()
    submodels: SubmodelParams = SubmodelParams()
    nuclei: NucleiParams = NucleiParams()

    def section(self, name: str) -> Section:
        """The section called ``name``; KeyError for an unknown one."""
        if name not in SECTIONS:
            raise KeyError(name)
        return typing.cast(Section, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples), as written to ``config.yaml``."""
        return self.model_dump(mode="json")

    def section_hash(self, *names: str) -> str:
        """A short hash of some sections (all when none are named)."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names or SECTIONS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Section name -> its model, in the order of ``configs/default.yaml``.
SECTIONS: dict[str, type[Section]] = {
    name: typing.cast(type[Section], f.annotation)
    for name, f in Config.model_fields.items() if name != "stages"}


_TYPE_NAMES = {"float": "float", "int": "int", "bool": "bool (true or false)",
               "string": "str", "tuple": "a list", "list": "a list", "dict": "a mapping",
               "model": "a mapping", "model_attributes": "a mapping"}


def describe_error(model: type[BaseModel], err: ErrorDetails) -> str:
    """One pydantic error as ``key: what is wrong``; ``key`` is the dotted location
    inside ``model`` (empty for the model itself)."""
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, SettingsError):  # a nested section's own check
        first = inner.details[0]
        return describe_error(model, {**first, "loc": (*err["loc"], *first["loc"])})
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc)
    name = loc[-1] if loc else ""
    got = f", got {err['input']!r}" if "input" in err else ""
    kind = err["type"]
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        text = f"{name} must be {op} {ctx[key]}{got}"
    elif kind == "literal_error":
        allowed = _allowed(model, loc)
        text = f"must be one of {', '.join(allowed) if allowed else ctx.get('expected')}{got}"
    elif kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        valid = ", ".join(parent.model_fields) if parent is not None else ""
        if len(loc) == 1:
            return f"unknown key {name!r}; valid keys: {valid}"
        return f"{path}: unknown key; valid keys: {valid}"
    elif kind == "value_error":
        text = str(ctx.get("error", err["msg"]))
    elif kind == "too_short":
        text = f"{name} must list at least {ctx.get('min_length')} item(s){got}"
    elif kind.endswith(("_type", "_parsing")):
        base = kind.rsplit("_", 1)[0]
        text = f"must be {_TYPE_NAMES.get(base, base)}{got}"
    else:
        text = f"{err['msg']}{got}"
    return f"{path}: {text}" if path else text


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The (nested) model class at ``loc``, or None when ``loc`` leaves the models."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _allowed(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The Literal values allowed at ``loc`` (list positions skipped), if any."""
    keys = [p for p in loc if not p.isdigit()]
    parent = _model_at(model, keys[:-1]) if keys else None
    field = parent.model_fields.get(keys[-1]) if parent is not None else None
    return [] if field is None else [str(v) for v in _literal_args(field.annotation)]


def _literal_args(hint: Any) -> list[Any]:
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    out: list[Any] = []
    for arg in typing.get_args(hint):
        out += _literal_args(arg)
    return out
