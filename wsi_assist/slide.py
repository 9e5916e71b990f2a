"""Open whole-slide images with tiffslide and describe them (levels, vendor, mpp).

The microscope resolution (mpp, micrometres per level-0 pixel) is found by a cascade,
and where it came from is recorded with it:

1. ``metadata``: the vendor's own field (Aperio ``MPP``, OME ``PhysicalSizeX``, Philips
   pixel spacing, Leica SCN resolution).
2. ``tiff-resolution``: TIFF ``XResolution`` when its unit is cm or inch (or mm, um) and
   the value is plausible for a microscope; 72/96 dpi screen defaults are rejected.
3. ``objective-power``: an estimate, 10 / power (40x -> 0.25, 20x -> 0.5 um/px).
4. ``override``: the user's ``--mpp X`` or ``--mpp-csv FILE``, for slides that carry none.

Pixels come in one of two layouts: ``rgb`` (8-bit RGB, YXS: brightfield, and RGB
fluorescence scans) or ``channels`` (one plane per channel, CYX or YX, 8- or 16-bit:
multiplex fluorescence such as Vectra QPTIFF or OME-TIFF). Channel names come from the
OME-XML ``Channel Name``, or a QPTIFF page's PerkinElmer XML (``<Biomarker>`` and
``<Name>``), else ``Channel 1..N``; colours from the same places where given.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_assist.errors import SlideError, in_words
from wsi_assist.files import file_problem

log = logging.getLogger(__name__)

MppSource = Literal["metadata", "tiff-resolution", "objective-power", "override"]
Layout = Literal["rgb", "channels"]
RGB = tuple[int, int, int]

#: Channel names of an RGB slide.
RGB_CHANNELS = ("Red", "Green", "Blue")
#: Pixel types of multichannel slides that are read (8- and 16-bit, and float).
CHANNEL_DTYPES = ("uint8", "uint16", "int16", "float32")

#: Plausible microscope resolutions in um/px; outside this a TIFF resolution is not trusted.
MPP_PLAUSIBLE = (0.05, 20.0)
#: Extensions of formats tiffslide cannot read, with what to do instead.
UNSUPPORTED = {
    ".mrxs": "3DHISTECH MRXS is not supported (tiffslide reads TIFF-based formats); "
    "convert it to OME-TIFF, e.g. with `vips tiffsave --tile --pyramid`",
    ".dcm": "DICOM WSI is not supported; convert it to OME-TIFF",
    ".czi": "Zeiss CZI is not supported; convert it to OME-TIFF, e.g. with bfconvert",
    ".vsi": "Olympus VSI is not supported; convert it to OME-TIFF, e.g. with bfconvert",
    ".vms": "Hamamatsu VMS is not supported; convert it to OME-TIFF",
    ".isyntax": "Philips iSyntax is not supported; export it as Philips TIFF",
    ".kfb": "KFBio KFB is not supported; convert it to TIFF",
}
#: Extensions looked for when a folder is given.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".btf")


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: geometry, vendor and resolution, with the source of the mpp."""

    path: str
    format: str
    vendor: str | None
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: MppSource | None
    objective_power: float | None
    synthetic: bool = False
    #: ``rgb`` (8-bit RGB) or ``channels`` (one plane per channel, the slide's dtype).
    layout: Layout = "rgb"
    #: Channel names, in the order of the pixels' last axis.
    channels: tuple[str, ...] = RGB_CHANNELS
    #: Pixel dtype of the source (``uint8`` for RGB).
    dtype: str = "uint8"
    #: Per channel, the display colour the file gives it (None where it gives none).
    channel_colors: tuple[RGB | None, ...] = ()

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise SlideError(f"{self.path}: empty image ({self.width} x {self.height} px)")
        if len(self.level_dimensions) != self.level_count:
            raise ValueError(f"level_dimensions has {len(self.level_dimensions)} entries, "
                             f"expected {self.level_count}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp!r}")
        if (self.mpp is None) != (self.mpp_source is None):
            raise ValueError("mpp and mpp_source must both be set or both be None")
        if not self.channels or (self.layout == "rgb" and len(self.channels) != 3):
            raise ValueError(f"layout {self.layout} with channels {self.channels!r}")
        if self.channel_colors and len(self.channel_colors) != len(self.channels):
            raise ValueError(f"channel_colors has {len(self.channel_colors)} entries for "
                             f"{len(self.channels)} channels")

    @property
    def multichannel(self) -> bool:
        """One plane per channel (fluorescence CYX), not RGB."""
        return self.layout == "channels"

    def level_mpp(self, level: int) -> float:
        """The mpp of a pyramid level (level-0 mpp times its downsample)."""
        return self.require_mpp() * self.level_downsamples[level]

    def require_mpp(self) -> float:
        """The mpp, or a SlideError that names the override options."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: no resolution found (no vendor mpp, no plausible TIFF "
                "resolution, no objective power); give it with --mpp X or --mpp-csv FILE")
        return self.mpp

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["channels"] = list(self.channels)
        d["channel_colors"] = [None if c is None else list(c) for c in self.channel_colors]
        return d


def find_slides(paths: list[Path]) -> list[Path]:
    """Files given directly, and entries named like slides found recursively in folders,
    sorted; each file once. Entries that are not regular files (a FIFO or a folder named
    ``x.svs``, a link loop) are kept, so that the batch reports them instead of dropping
    them silently; :func:`check_file` says what is wrong with them."""
    found: list[Path] = []
    exts = SLIDE_EXTENSIONS + tuple(UNSUPPORTED)
    for p in paths:
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in exts))
        else:
            found.append(p)
    seen: set[str] = set()
    unique = []
    for f in found:
        key = os.path.realpath(f)  # never raises, even on a link loop
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def open_slide(path: str | Path) -> Any:
    """Open ``path`` with tiffslide; a SlideError says which file and why it failed."""
    import tiffslide

    path = Path(path)
    check_file(path)
    reason = UNSUPPORTED.get(path.suffix.lower())
    if reason:
        raise SlideError(f"{path}: {reason}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slide = tiffslide.TiffSlide(path)
            _ = slide.properties  # parses the metadata: a bad file fails here
    except Exception as e:  # tifffile raises many types for malformed files
        raise SlideError(f"{path}: not a readable TIFF-based slide "
                         f"({in_words(e, 'damaged or inconsistent TIFF structure')})") from e
    return slide


def check_file(path: Path) -> None:
    """SlideError naming ``path`` unless it is a non-empty regular file that can be read:
    folders, FIFOs, sockets, devices, broken links and link loops are refused without
    being opened (opening a FIFO blocks)."""
    problem = file_problem(path)
    if problem:
        raise SlideError(f"{path}: {problem}")


def describe(path: str | Path, mpp_override: float | None = None,
             check_pixels: bool = True) -> SlideInfo:
    """Open a slide, read its geometry and resolution, and (by default) check pixels decode."""
    path = Path(path)
    slide = open_slide(path)
    try:
        info = _describe_open(slide, path, mpp_override)
        if check_pixels:
            check_readable(slide, path)
    except ValueError as e:  # SlideInfo refusing what the file's tags say
        raise SlideError(f"{path}: inconsistent slide description ({e})") from e
    finally:
        slide.close()
    return info


def _describe_open(slide: Any, path: Path, mpp_override: float | None) -> SlideInfo:
    props = slide.properties
    try:
        dims = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        downsamples = tuple(float(d) for d in slide.level_downsamples)
    except Exception as e:
        raise SlideError(f"{path}: cannot read the pyramid levels ({in_words(e)})") from e
    vendor = props.get("tiffslide.vendor")
    power = finite_float(props.get("tiffslide.objective-power"))
    mpp, source = resolve_mpp(slide, power, mpp_override)
    fmt = vendor or ("qptiff" if _is_qpi(slide) else "ome-tiff" if _ome_xml(slide)
                     else "generic-tiff")
    desc = str(props.get("tiff.ImageDescription") or "")
    layout, names, dtype, colors = _channels(slide, path)
    return SlideInfo(
        path=str(path), format=fmt, vendor=vendor, width=dims[0][0], height=dims[0][1],
        level_count=len(dims), level_dimensions=dims, level_downsamples=downsamples,
        mpp=mpp, mpp_source=source, objective_power=power,
        synthetic="wsi-assist synthetic" in desc, layout=layout, channels=names,
        dtype=dtype, channel_colors=colors)


def slide_layout(slide: Any) -> Layout:
    """``channels`` when an open slide's series is CYX, or a single plane (YX) of an
    OME-TIFF or QPTIFF (one fluorescence channel); else ``rgb`` (a grey plane of another
    TIFF is refused by the pixel check)."""
    axes = slide.properties.get("tiffslide.series-axes")
    if axes == "CYX" or (axes == "YX" and (_is_qpi(slide) or _ome_xml(slide))):
        return "channels"
    return "rgb"


def _channels(slide: Any, path: Path
              ) -> tuple[Layout, tuple[str, ...], str, tuple[RGB | None, ...]]:
    """(layout, channel names, dtype, metadata colours) of an open slide."""
    try:  # a composed series has no plain level-0 array; the pixel check says more
        arr = slide.zarr_group["0"]
        dtype = str(arr.dtype)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        log.debug("%s: no level-0 array (%s)", path, e)
        return "rgb", RGB_CHANNELS, "uint8", ()
    if slide_layout(slide) == "rgb":
        return "rgb", RGB_CHANNELS, dtype, ()
    n = int(arr.shape[0]) if arr.ndim == 3 else 1
    found = _ome_channels(slide) or _qpi_channels(slide)
    if len(found) != n:
        found = [(None, None)] * n
    names = tuple(name or f"Channel {i + 1}" for i, (name, _) in enumerate(found))
    return "channels", names, dtype, tuple(color for _, color in found)


def _ome_channels(slide: Any) -> list[tuple[str | None, RGB | None]]:
    """(name, colour) of each OME Channel of the slide's image; [] when not OME."""
    xml = _ome_xml(slide)
    if not xml:
        return []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    images = [el for el in root if el.tag.endswith("}Image") or el.tag == "Image"]
    index = int(slide.properties.get("tiffslide.series-index") or 0)
    if index >= len(images):
        return []
    out: list[tuple[str | None, RGB | None]] = []
    for el in images[index].iter():
        if el.tag.endswith("Channel"):
            name = (el.attrib.get("Name") or "").strip() or None
            out.append((name, _ome_color(el.attrib.get("Color"))))
    return out


def _ome_color(value: str | None) -> RGB | None:
    """An OME colour (a signed 32-bit RGBA integer) as RGB; None for none or white (-1,
    the default meaning no colour chosen)."""
    try:
        v = int(str(value)) & 0xFFFFFFFF
    except ValueError:
        return None
    rgb = ((v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255)
    return None if rgb in ((255, 255, 255), (0, 0, 0)) else rgb


def _is_qpi(slide: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(slide.ts_tifffile.is_qpi)
    return False


def _qpi_channels(slide: Any) -> list[tuple[str | None, RGB | None]]:
    """(name, colour) of each full-resolution page of a PerkinElmer (Vectra) QPTIFF,
    from the XML in its ImageDescription: ``<Biomarker>`` and ``<Name>`` (the
    fluorophore), ``<Color>`` as ``R,G,B``; [] when not QPTIFF."""
    if not _is_qpi(slide):
        return []
    try:
        series = slide.ts_tifffile.series[int(slide.properties.get("tiffslide.series-index")
                                              or 0)]
        pages = series.levels[0].pages
    except (AttributeError, IndexError, ValueError):
        return []
    out: list[tuple[str | None, RGB | None]] = []
    for page in pages:
        try:
            root = ET.fromstring(page.description)
        except (ET.ParseError, AttributeError, TypeError):
            out.append((None, None))
            continue
        name = (root.findtext("Name") or "").strip()
        marker = (root.findtext("Biomarker") or "").strip()
        if marker and name and marker.lower() != name.lower():
            name = f"{marker} ({name})"
        out.append((marker if marker and not name else name or None,
                    _rgb_text(root.findtext("Color"))))
    return out


def _rgb_text(text: str | None) -> RGB | None:
    """``"R,G,B"`` as a colour; None when absent, malformed, white or black."""
    try:
        r, g, b = (int(v) for v in str(text).split(","))
    except ValueError:
        return None
    rgb = (min(max(r, 0), 255), min(max(g, 0), 255), min(max(b, 0), 255))
    return None if rgb in ((255, 255, 255), (0, 0, 0)) else rgb


def check_readable(slide: Any, path: Path) -> None:
    """Decode a small region of the coarsest level; SlideError if the pixels are corrupt."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = slide.read_region((0, 0), level, (min(w, 64), min(h, 64)), as_array=True)
    except Exception as e:
        raise SlideError(f"{path}: pixel data cannot be decoded "
                         f"({in_words(e, 'damaged or inconsistent image data')})") from e
    _check_not_truncated(slide, path)
    if slide_layout(slide) == "channels":
        if arr.ndim != 3 or str(arr.dtype) not in CHANNEL_DTYPES:
            raise SlideError(f"{path}: unsupported pixel type {arr.dtype} in a "
                             f"multichannel image; expected one of "
                             f"{', '.join(CHANNEL_DTYPES)}")
    elif arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(f"{path}: unsupported pixel type {arr.dtype} with shape "
                         f"{arr.shape[2:] or '(grey)'}; expected 8-bit RGB or one plane "
                         "per channel (CYX; a single plane only in OME-TIFF or QPTIFF)")


def _check_not_truncated(slide: Any, path: Path) -> None:
    """Every level's compressed data must lie inside the file (a cut copy fails here)."""
    size = path.stat().st_size
    try:
        series = slide._tifffile.series[slide.properties.get("tiffslide.series-index", 0)]
        pages = [(i, p) for i, lvl in enumerate(series.levels) for p in lvl.pages
                 if p is not None]
    except Exception:  # not all formats expose levels this way; pixels were checked anyway
        return
    for i, page in pages:
        # tags whose values lie past the end of a cut file are dropped by tifffile, which
        # then reads the level as zeros: no offsets at all is a truncated file too
        expected = int(np.prod(getattr(page, "chunked", ()) or (0,)))
        if expected and len(page.dataoffsets) < expected:
            raise SlideError(f"{path}: file is truncated or damaged (level {i} has "
                             f"{len(page.dataoffsets)} of its {expected} tile or strip "
                             "offsets)")
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise SlideError(f"{path}: file is truncated (level {i} data ends at byte "
                             f"{max(ends)}, file has {size})")


def resolve_mpp(slide: Any, objective_power: float | None,
                override: float | None = None) -> tuple[float | None, MppSource | None]:
    """Run the mpp cascade on an open tiffslide slide; returns (mpp, source)."""
    props = slide.properties
    mpp = _metadata_mpp(slide)
    if mpp is not None:
        return mpp, "metadata"
    mpp = tiff_resolution_mpp(props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution"))
    if mpp is not None:
        return mpp, "tiff-resolution"
    if objective_power and objective_power > 0:
        return 10.0 / objective_power, "objective-power"
    if override is not None:
        return float(override), "override"
    return None, None


def tiff_resolution_mpp(unit: str | None, x_resolution: float | None) -> float | None:
    """um/px from a TIFF resolution, or None when the unit is absent or the value implausible."""
    scale = {"INCH": 25400.0, "CENTIMETER": 10000.0, "MILLIMETER": 1000.0,
             "MICROMETER": 1.0}.get(str(unit or "").upper())
    if scale is None or not x_resolution or x_resolution <= 0:
        return None
    if scale == 25400.0 and round(x_resolution) in (72, 96, 150, 300):
        return None  # screen or printer defaults, not a scanner's resolution
    mpp = scale / float(x_resolution)
    lo, hi = MPP_PLAUSIBLE
    return mpp if lo <= mpp <= hi else None


def _metadata_mpp(slide: Any) -> float | None:
    props = slide.properties
    vendor = props.get("tiffslide.vendor")
    if vendor == "aperio":
        return finite_float(props.get("aperio.MPP"))
    if vendor in ("leica", "philips") or (vendor and "tiff.XResolution" not in props):
        return finite_float(props.get("tiffslide.mpp-x"))
    ome = _ome_xml(slide)
    if ome:
        return _ome_mpp(ome)
    return None


def _ome_xml(slide: Any) -> str | None:
    with contextlib.suppress(Exception):
        return slide._tifffile.ome_metadata
    return None


def _ome_mpp(xml: str) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, converted to um."""
    to_um = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            factor = to_um.get(el.attrib.get("PhysicalSizeXUnit", "µm"))
            value = finite_float(el.attrib["PhysicalSizeX"])
            if factor and value and value > 0:
                return value * factor
    return None


def read_mpp_csv(path: Path) -> dict[str, float]:
    """A CSV of ``slide,mpp`` rows (slide = file name, stem or path) -> {key: mpp}."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SlideError(f"{path}: cannot read the mpp CSV ({e.strerror})") from e
    if not rows or not {"slide", "mpp"} <= set(rows[0]):
        raise SlideError(f"{path}: the mpp CSV needs the columns 'slide' and 'mpp'")
    out: dict[str, float] = {}
    for i, row in enumerate(rows, start=2):
        try:
            value = float(row["mpp"])
        except (TypeError, ValueError):
            raise SlideError(f"{path}: line {i}: mpp {row['mpp']!r} is not a number") from None
        if not value > 0:
            raise SlideError(f"{path}: line {i}: mpp must be positive, got {value}")
        out[row["slide"].strip()] = value
    return out


def mpp_for(path: Path, mpp: float | None, table: dict[str, float] | None) -> float | None:
    """The override for one slide: its row in the CSV table (by path, name or stem), else mpp."""
    if table:
        for key in (str(path), path.name, path.stem):
            if key in table:
                return table[key]
    return mpp


def finite_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None
