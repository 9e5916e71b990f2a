"""QuPath-ready GeoJSON: features built and written the way QuPath's importer reads them.

QuPath reads ``objectType`` and ``classification`` from inside ``properties``;
``classification`` must be an object ``{"name", "color": [r, g, b]}``; ``measurements``
an object of name -> finite number. Coordinates are level-0 pixels.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import shapely
from shapely.geometry import mapping

from wsi_assist.files import atomic_open

ObjectType = Literal["annotation", "detection", "cell", "tile"]
OBJECT_TYPES = ("annotation", "detection", "cell", "tile")
Color = tuple[int, int, int]


def feature(geometry: shapely.Geometry, object_type: ObjectType, *,
            classification: tuple[str, Color] | None = None,
            measurements: Mapping[str, float] | None = None,
            name: str | None = None, locked: bool | None = None,
            metadata: Mapping[str, str] | None = None,
            feature_id: str | None = None) -> dict[str, Any]:
    """One GeoJSON Feature in QuPath's layout; invalid geometries are repaired."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = name
    if classification is not None:
        cname, color = classification
        props["classification"] = {"name": cname, "color": [int(c) for c in color]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()
                                 if v is not None and math.isfinite(float(v))}
    if locked is not None:
        props["isLocked"] = bool(locked)
    if metadata:
        props["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return {"type": "Feature", "id": feature_id or str(uuid.uuid4()),
            "geometry": mapping(geometry), "properties": props}


def write_features(path: Path, features: Iterable[Mapping[str, Any]]) -> int:
    """Stream features into a FeatureCollection file (atomically); returns the count.

    Features are serialised one at a time, so a generator of hundreds of thousands of
    detections is never held twice in memory.
    """
    n = 0
    with atomic_open(path, fsync=True) as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feat in features:
            if n:
                f.write(",\n")
            f.write(json.dumps(feat, separators=(",", ":"), allow_nan=False))
            n += 1
        f.write("\n]}\n")
    return n


def read_features(path: Path) -> list[dict[str, Any]]:
    """The features of a GeoJSON FeatureCollection file."""
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if data.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: not a FeatureCollection")
    return list(data["features"])
