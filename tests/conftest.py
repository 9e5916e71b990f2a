"""Shared fixtures: synthetic slides with known answers, and the real slides in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_assist.synthetic import Ellipse, SyntheticSlide, default_slide, write_slide

SHARED_SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "slides"
REAL_SLIDES = ["CMU-1-Small-Region.svs", "HE_example.ome.tif", "test3-DAPI-2-387.ndpi"]


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """../shared/slides, or a skip saying why."""
    if not (SHARED_SLIDES / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real slides not found at {SHARED_SLIDES} (they live beside the project)")
    return SHARED_SLIDES


@pytest.fixture(scope="session")
def syn_spec() -> SyntheticSlide:
    """2048 x 1536 px of H&E-like tissue: three pink ellipses with purple nuclei."""
    return default_slide(2048, 1536)


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def svs_slide(syn_dir: Path, syn_spec: SyntheticSlide) -> Path:
    """Aperio-style SVS: JPEG tiles, MPP 0.5 and AppMag 20 in the description, 2 levels."""
    return write_slide(syn_dir / "aperio.svs", syn_spec, kind="svs", mpp=0.5)


@pytest.fixture(scope="session")
def tiff_slide(syn_dir: Path, syn_spec: SyntheticSlide) -> Path:
    """Generic pyramidal TIFF with resolution tags in cm (0.25 um/px)."""
    return write_slide(syn_dir / "generic.tif", syn_spec, kind="tiff", mpp=0.25)


@pytest.fixture(scope="session")
def nompp_slide(syn_dir: Path, syn_spec: SyntheticSlide) -> Path:
    """Generic TIFF with no resolution at all."""
    return write_slide(syn_dir / "nompp.tif", syn_spec, kind="tiff-no-mpp")


@pytest.fixture(scope="session")
def odd_slide(syn_dir: Path, syn_spec: SyntheticSlide) -> Path:
    """Levels with a non-integer downsample (2048 -> 853 px, about 2.4x), 0.25 um/px."""
    return write_slide(syn_dir / "odd.tif", syn_spec, kind="tiff", mpp=0.25,
                       level_sizes=[(853, 640)])


@pytest.fixture(scope="session")
def blank_slide(syn_dir: Path) -> Path:
    """White glass only: no tissue."""
    return write_slide(syn_dir / "blank.svs", SyntheticSlide(1024, 768, blank=True), kind="svs")


__all__ = ["REAL_SLIDES", "Ellipse"]
