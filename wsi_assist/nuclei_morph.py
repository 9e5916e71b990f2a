"""Grey-level reconstruction for the built-in nuclei, at pipeline speed.

:func:`reconstruct_by_dilation` gives exactly what ``skimage.morphology.reconstruction``
(method ``dilation``, 8-connected) gives, with one sort of the pixels instead of two:
scikit-image ranks the values with a second full ``argsort`` (``rank_order``); here the
ranks come from the first sort's order (a cumulative count of distinct values). The
flooding itself is scikit-image's own compiled loop. Where that private loop is not
importable (another scikit-image), the public function is used: same result, slower.

:func:`h_maxima` is ``skimage.morphology.h_maxima`` for float images on top of it.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

try:  # scikit-image's compiled flooding loop (private; the public path is the fallback)
    from skimage.morphology._grayreconstruct import reconstruction_loop as _loop
except ImportError:  # pragma: no cover - depends on the scikit-image build
    _loop = None

#: 8-neighbour offsets (dy, dx) of the flooding, the centre left out.
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def reconstruct_by_dilation(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reconstruction by dilation of ``seed`` under ``mask`` (2-D, ``seed <= mask``),
    8-connected, in the float type scikit-image would use (float32 for float32)."""
    seed, mask = np.asarray(seed), np.asarray(mask)
    if seed.shape != mask.shape or seed.ndim != 2:
        raise ValueError(f"seed and mask must be 2-D of one shape, got {seed.shape} "
                         f"and {mask.shape}")
    if _loop is None:  # pragma: no cover
        from skimage.morphology import reconstruction

        return np.asarray(reconstruction(seed, mask, method="dilation"))
    if np.any(seed > mask):
        raise ValueError("the seed must not exceed the mask in a reconstruction by dilation")
    dtype = np.float32 if mask.dtype == np.float32 and seed.dtype == np.float32 else np.float64
    h, w = seed.shape
    images = np.full((2, h + 2, w + 2), np.min(seed), dtype)
    images[0, 1:-1, 1:-1] = seed
    images[1, 1:-1, 1:-1] = mask
    size = images.size
    itype = np.result_type(np.min_scalar_type(-size), np.int32)
    strides = np.array([dy * (w + 2) + dx for dy, dx in _NEIGHBOURS], itype)
    flat = images.reshape(-1)
    order = ascending_order(flat).astype(itype, copy=False)
    ranked = flat[order]
    new = np.empty(size, bool)
    new[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=new[1:])
    values = ranked[new]  # the distinct values, ascending
    rank = np.empty(size, np.dtype(itype.char.upper()))
    rank[order] = np.cumsum(new, dtype=rank.dtype) - 1
    order = order[::-1]  # dilation floods from the highest value down
    prev = np.full(size, -1, itype)
    nxt = np.full(size, -1, itype)
    prev[order[1:]] = order[:-1]
    nxt[order[:-1]] = order[1:]
    image_stride = (h + 2) * (w + 2)
    _loop(rank, prev, nxt, strides, order[0], image_stride)
    return values[rank[:image_stride]].reshape(h + 2, w + 2)[1:-1, 1:-1]


def ascending_order(values: np.ndarray) -> np.ndarray:
    """Indices that sort 1-D ``values`` ascending (ties in any order): for float32 and
    float64, a radix sort of their order-preserving integer keys, 16 bits a pass
    (numpy's stable sort of 16-bit keys is a radix sort), 2-3x faster than ``argsort``."""
    if values.dtype not in (np.float32, np.float64):
        return np.argsort(values)
    utype = np.dtype(np.uint32 if values.dtype == np.float32 else np.uint64)
    nbits = 8 * utype.itemsize
    bits = values.view(utype)
    sign = np.array(1 << (nbits - 1), utype)
    key = np.where(bits & sign, ~bits, bits | sign)
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    for shift in range(16, nbits, 16):
        digit = (key >> np.array(shift, utype)).astype(np.uint16)[order]
        order = order[np.argsort(digit, kind="stable")]
    return order


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h)`` of a float image (bool): the regional
    maxima at least ``h`` high, 8-connected."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating) or not h > 0:
        raise ValueError(f"h_maxima needs a float image and h > 0, got {image.dtype}, {h}")
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    rec = reconstruct_by_dilation(image - h - resolution, image)
    return np.asarray((image - rec) >= h)


def h_maxima_by_object(image: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """:func:`h_maxima` of a non-negative ``image`` that is 0 outside ``objects`` (bool),
    with ``h = 0.5``, computed on the bounding boxes of the 8-connected objects alone,
    packed side by side with a gap of background: the same result as on the whole image
    (between objects the flooding passes only through zeros, whose level the whole image
    sets: 0 once any pixel reaches ``h``), at a fraction of the cost when objects cover
    little of the image."""
    h = 0.5
    image = np.asarray(image)
    out = np.zeros(image.shape, bool)
    comps, n = ndi.label(objects, structure=np.ones((3, 3), bool))
    if not n:
        return out
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    shifted = image - h - resolution
    floor = min(0.0, float(shifted.max()))  # the level of the zeros between objects
    boxes = [sl for sl in ndi.find_objects(comps) if sl is not None]
    places, shape = _shelves([(b[0].stop - b[0].start, b[1].stop - b[1].start)
                              for b in boxes])
    seed = np.full(shape, floor, image.dtype)
    mask = np.zeros(shape, image.dtype)
    for i, (box, (y, x)) in enumerate(zip(boxes, places, strict=True), start=1):
        own = comps[box] == i
        at = (slice(y, y + own.shape[0]), slice(x, x + own.shape[1]))
        seed[at][own] = shifted[box][own]
        mask[at][own] = image[box][own]
    peak = (mask - reconstruct_by_dilation(seed, mask)) >= h
    for i, (box, (y, x)) in enumerate(zip(boxes, places, strict=True), start=1):
        own = comps[box] == i
        out[box] |= own & peak[y:y + own.shape[0], x:x + own.shape[1]]
    return out


def _shelves(sizes: list[tuple[int, int]], gap: int = 1
             ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners (y, x) that lay boxes of ``sizes`` (h, w) out in rows, ``gap``
    pixels apart and from the edges; and the (h, w) of the canvas that holds them."""
    width = max(max(w for _, w in sizes), int(np.sqrt(sum(h * w for h, w in sizes))) * 2)
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    y = x = gap
    row = 0
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k][0]):
        hk, wk = sizes[k]
        if x + wk + gap > width + 2 * gap:
            y, x, row = y + row + gap, gap, 0
        places[k] = (y, x)
        x += wk + gap
        row = max(row, hk)
    return places, (y + row + gap, width + 2 * gap)


try:  # scikit-image's compiled watershed (private; the public function is the fallback)
    from skimage.morphology._util import _offsets_to_raveled_neighbors as _neighbours
    from skimage.morphology._util import _validate_connectivity
    from skimage.segmentation._watershed_cy import watershed_raveled as _flood
except ImportError:  # pragma: no cover - depends on the scikit-image build
    _flood = None


def watershed_lines(image: np.ndarray, markers: np.ndarray, mask: np.ndarray
                    ) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=1,
    watershed_line=True)``, the same flood with the same inputs to scikit-image's compiled
    loop, without the public function's checks and copies (it is called once per object
    to split, hundreds of times a block)."""
    if _flood is None:  # pragma: no cover
        from skimage.segmentation import watershed

        return np.asarray(watershed(image, markers, mask=mask, connectivity=1,
                                    watershed_line=True))
    h, w = image.shape
    img = np.zeros((h + 2, w + 2), np.float64)
    img[1:-1, 1:-1] = image
    inside = np.zeros((h + 2, w + 2), np.int8)
    inside[1:-1, 1:-1] = mask
    out = np.zeros((h + 2, w + 2), np.result_type(markers.dtype, np.int8))
    out[1:-1, 1:-1] = markers * mask
    connectivity, offset = _validate_connectivity(2, 1, None)
    nbrs = _neighbours(img.shape, connectivity, center=offset)
    strides = np.array(img.strides, dtype=np.intp) // img.itemsize
    _flood(img.ravel(), np.flatnonzero(out), nbrs, inside.ravel(), strides, 0.0,
           out.ravel(), True)
    return out[1:-1, 1:-1].copy()
