"""Stains of a brightfield slide: optical density and colour deconvolution.

Optical density follows QuPath: ``OD = -log10(max(I, 1) / I0)`` per channel, with
``I0`` the background (white) value of each channel. Deconvolution multiplies OD by the
inverse of the row-normalised stain matrix (Ruifrok & Johnston), whose third row is the
residual (the cross product of the first two when not given).

:class:`StainVectors` is what a slide's analysis is run with: the kind of image, the stain
names, the three vectors, the background, and where they came from. The defaults are
QuPath's ("H-DAB default", "H&E default").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ImageKind = Literal["brightfield-he", "brightfield-hdab", "brightfield-other", "fluorescence"]
VectorSource = Literal["estimated", "default", "config"]

HEMATOXYLIN = (0.65111, 0.70119, 0.29049)
EOSIN = (0.2159, 0.8012, 0.5581)
DAB = (0.26917, 0.56824, 0.77759)


@dataclass(frozen=True)
class StainVectors:
    """Three stain OD vectors (rows of ``matrix``, unit length) and the background."""

    kind: ImageKind
    names: tuple[str, str, str]
    matrix: np.ndarray
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    source: VectorSource = "default"

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, np.float64)
        if m.shape != (3, 3) or not np.isfinite(m).all():
            raise ValueError(f"matrix must be 3 x 3 finite values, got {m.shape}")
        if abs(np.linalg.det(m)) < 1e-6:
            raise ValueError("stain vectors must be linearly independent")
        if min(self.background) <= 0:
            raise ValueError(f"background must be positive, got {self.background!r}")

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "names": list(self.names),
                "vectors": np.asarray(self.matrix).round(5).tolist(),
                "background": list(self.background), "source": self.source}


def stain_matrix(first: tuple[float, float, float], second: tuple[float, float, float],
                 third: tuple[float, float, float] | None = None) -> np.ndarray:
    """Row-normalised (3, 3) matrix; the residual is ``first x second`` when not given."""
    rows = [np.asarray(first, np.float64), np.asarray(second, np.float64)]
    rows.append(np.cross(rows[0], rows[1]) if third is None else np.asarray(third, np.float64))
    m = np.stack(rows)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def default_vectors(kind: ImageKind) -> StainVectors:
    """QuPath's default vectors for ``kind`` (H&E for other brightfield)."""
    if kind == "brightfield-hdab":
        return StainVectors(kind, ("Hematoxylin", "DAB", "Residual"),
                            stain_matrix(HEMATOXYLIN, DAB))
    return StainVectors(kind, ("Hematoxylin", "Eosin", "Residual"),
                        stain_matrix(HEMATOXYLIN, EOSIN))


def optical_density(rgb: np.ndarray, background: tuple[float, float, float] = (255, 255, 255)
                    ) -> np.ndarray:
    """float32 OD of uint8 RGB (..., 3) against ``background``."""
    i = np.maximum(np.asarray(rgb, np.float32)[..., :3], 1.0)
    return -np.log10(i / np.asarray(background, np.float32))


def deconvolve(rgb: np.ndarray, stains: StainVectors) -> np.ndarray:
    """Per-stain OD (..., 3), in the order of ``stains.names``."""
    od = optical_density(rgb, stains.background)
    inv = np.linalg.inv(np.asarray(stains.matrix, np.float64)).astype(np.float32)
    return od @ inv
