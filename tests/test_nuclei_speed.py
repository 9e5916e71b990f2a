"""The built-in nuclei's fast paths give what the straightforward ones give.

The grey reconstruction (one radix sort) against scikit-image's ``reconstruction``, the
per-object h-maxima against ``h_maxima`` of the whole image, the whole detection on
real tiles against the same detection built on scikit-image's functions, and the thread
pool of the stage against one block after another.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import h_maxima, reconstruction
from skimage.segmentation import watershed

from wsi_assist import nuclei as nu
from wsi_assist import nuclei_morph as nm
from wsi_assist.settings import NucleiParams
from wsi_assist.stages import nuclei as stage
from wsi_assist.stain import default_vectors


def _real(path, box: tuple[int, int, int, int]) -> np.ndarray:
    import tiffslide

    x, y, w, h = box
    with tiffslide.TiffSlide(path) as s:
        return np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reconstruction_equals_scikit_image(dtype) -> None:
    rng = np.random.default_rng(3)
    img = ndi.gaussian_filter(rng.random((157, 203)), 2).astype(dtype)
    img[40:60, 50:90] = img[40:60, 50:90].round(2)  # plateaus: ties in the sort
    img[100:110] -= 0.7  # negative values too
    seed = ndi.minimum_filter(img, 15)
    seed[0, 0] = img[0, 0]
    got = nm.reconstruct_by_dilation(seed, img)
    want = reconstruction(seed, img, method="dilation")
    assert got.dtype == want.dtype and np.array_equal(got, want)
    with pytest.raises(ValueError, match="seed must not exceed"):
        nm.reconstruct_by_dilation(img + 1, img)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radix_order_sorts_floats_of_any_sign(dtype) -> None:
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(size=5000), rng.normal(size=50) * 1e-200, rng.integers(0, 9, 300),
              0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf].astype(dtype)
    assert np.array_equal(v[nm.ascending_order(v)], np.sort(v))


def _edm(mask: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(ndi.distance_transform_edt(mask), nu.EDM_SMOOTHING) * mask


def test_h_maxima_by_object_equals_the_whole_image() -> None:
    yy, xx = np.mgrid[:200, :260]
    mask = np.zeros((200, 260), bool)
    rng = np.random.default_rng(5)
    for cy, cx, r in zip(rng.uniform(8, 192, 60), rng.uniform(8, 252, 60),
                         rng.uniform(2, 9, 60), strict=True):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # touching and lone discs
    mask[0:3, 0:40] = True  # a thin object on the border
    edm = _edm(mask)
    got = nm.h_maxima_by_object(edm, mask)
    want = h_maxima(edm, 0.5).astype(bool) & mask
    assert want.sum() > 40 and np.array_equal(got, want)


def test_watershed_lines_equal_scikit_image() -> None:
    """The per-object split flood: same labels and lines as scikit-image's watershed,
    plateaus (ties in its queue) included."""
    yy, xx = np.mgrid[:90, :120]
    mask = (((yy - 45) ** 2 + (xx - 40) ** 2 <= 900) | ((yy - 45) ** 2 + (xx - 80) ** 2 <= 900))
    edm = np.round(_edm(mask), 1)  # rounded: many equal values
    peaks, _ = ndi.label(nm.h_maxima_by_object(edm, mask))
    assert peaks.max() >= 2
    got = nm.watershed_lines(-edm, peaks, mask)
    want = watershed(-edm, peaks, mask=mask, connectivity=1, watershed_line=True)
    assert np.array_equal(got, want) and (got[mask] == 0).any()


@pytest.mark.real_slides
@pytest.mark.parametrize("name, box, mpp, kind", [
    ("CMU-1-Small-Region.svs", (900, 1200, 420, 420), 0.499, "brightfield-he"),
    ("OS-2-vsi-Ki67.ome.tif", (300, 300, 520, 520), 0.3461, "brightfield-hdab")])
def test_fast_detection_equals_the_straightforward_one(shared_slides, monkeypatch, name,
                                                       box, mpp, kind) -> None:
    """On real tiles: the same nuclei, outlines and measurements as the analysis built on
    scikit-image's reconstruction, whole-image h-maxima and public watershed (tolerance:
    float rounding)."""
    rgb = _real(shared_slides / name, box)
    stains, params = default_vectors(kind), NucleiParams()
    mask = nu.segment(nu.deconvolve(rgb, stains)[..., 0], mpp, params)[0] > 0
    edm = _edm(mask)
    assert np.array_equal(nm.h_maxima_by_object(edm, mask),
                          h_maxima(edm, 0.5).astype(bool) & mask)
    fast = nu.detect_nuclei(rgb, mpp, stains, params)
    monkeypatch.setattr(nu, "reconstruct_by_dilation",
                        lambda s, m: reconstruction(s, m, method="dilation"))
    monkeypatch.setattr(nu, "h_maxima_by_object",
                        lambda e, m: h_maxima(e, 0.5).astype(bool))
    monkeypatch.setattr(nu, "watershed_lines", lambda i, k, m: watershed(
        i, k, mask=m, connectivity=1, watershed_line=True))
    ref = nu.detect_nuclei(rgb, mpp, stains, params)
    assert len(ref) > 50 and len(fast) == len(ref)
    np.testing.assert_allclose(fast.centroids, ref.centroids, atol=1e-6)
    assert np.array_equal(fast.offsets, ref.offsets)
    np.testing.assert_allclose(fast.vertices, ref.vertices, atol=1e-4)
    np.testing.assert_allclose(fast.measurements, ref.measurements, rtol=1e-5, atol=1e-6)


def test_blocks_in_threads_come_back_in_order_with_few_held() -> None:
    held, most, lock = [0], [0], threading.Lock()

    def job(i: int, tile: np.ndarray) -> int:
        with lock:
            held[0] += 1
            most[0] = max(most[0], held[0])
        time.sleep(0.002 * (i % 3))
        with lock:
            held[0] -= 1
        return i * 10 + int(tile[0])

    work = ((i, np.array([i])) for i in range(40))
    got = list(stage._in_threads(job, work, 3))  # type: ignore[arg-type]
    assert got == [i * 11 for i in range(40)]
    assert 1 < most[0] <= 6
    assert list(stage._in_threads(job, iter([(2, np.array([1]))]), 1)) == [21]  # type: ignore[arg-type]
    assert stage.workers(NucleiParams(workers=2)) == 2 and stage.workers(NucleiParams()) >= 1
