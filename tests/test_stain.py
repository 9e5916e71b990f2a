"""Optical density and colour deconvolution against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_assist.stain import DAB, HEMATOXYLIN, default_vectors, deconvolve, optical_density


def _rgb_of(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(255 * 10 ** -od), 0, 255).astype(np.uint8)


def test_deconvolution_recovers_stain_amounts() -> None:
    stains = default_vectors("brightfield-hdab")
    h, d = np.asarray(HEMATOXYLIN), np.asarray(DAB)
    od = 0.6 * h / np.linalg.norm(h) + 0.3 * d / np.linalg.norm(d)
    out = deconvolve(_rgb_of(od)[None, None], stains)[0, 0]
    np.testing.assert_allclose(out, [0.6, 0.3, 0.0], atol=0.02)


def test_od_of_white_is_zero_and_of_black_is_bounded() -> None:
    od = optical_density(np.array([[255, 255, 255], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(od[0], 0.0)
    np.testing.assert_allclose(od[1], np.log10(255), rtol=1e-5)


def test_vectors_must_be_independent() -> None:
    v = default_vectors("brightfield-he")
    with pytest.raises(ValueError, match="independent"):
        type(v)(v.kind, v.names, np.ones((3, 3)))
