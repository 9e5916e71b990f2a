"""Agreement of the built-in nucleus analysis with QuPath's "Positive cell detection".

Runs the analysis the way the ``submodels`` stage does (the tile stream, each tile with a
halo, nuclei kept by the tile holding their centroid) over the whole image, with no
tissue detection and no tile filtering (QuPath's "select all" annotation), and counts
cells and positive cells. It also analyses the image in one piece, to show that tiling
changes nothing worth mentioning.

    python bench/accuracy.py                     # the 4 published settings on OS-2-vsi-Ki67
    python bench/accuracy.py OS-2-ndpi.ome.tif   # the same on the other published crop
    python bench/accuracy.py IMAGE [--mpp X] [--detection-threshold T] [--dab-threshold D]
                             [--params published|default] [--stains hdab|he] [--png OUT]

With no threshold given, an IMAGE whose name has published QuPath results (the two Ki-67
crops of that repository: OS-2-vsi, here ../shared/slides/OS-2-vsi-Ki67.ome.tif, and
OS-2-ndpi, a crop of the same slide scanned by a Hamamatsu scanner, not in ../shared) is
run at the four published settings and printed beside QuPath's numbers.

``--params published`` (the default) uses the settings of the published QuPath 0.3.2
comparison (petebankhead/2022-qupath-cell-detection, "OS-2 Ki67 thresholds.groovy"):
``detectionImageBrightfield`` Optical density sum, ``requestedPixelSizeMicrons`` 0.5,
``backgroundRadiusMicrons`` 0, ``medianRadiusMicrons`` 0, ``sigmaMicrons`` 2,
``minAreaMicrons`` 10, ``maxAreaMicrons`` 400, ``maxBackground`` 2, ``watershedPostProcess``
and ``smoothBoundaries`` true, ``thresholdCompartment`` Nucleus: DAB OD mean, single
threshold, H-DAB default stain vectors; ``--params default`` uses the ``nuclei`` section
of configs/default.yaml (QuPath's own defaults). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapely

from wsi_assist import config
from wsi_assist import nuclei as nu
from wsi_assist.settings import NucleiParams, TilingParams
from wsi_assist.slide import describe
from wsi_assist.stages import nuclei as builtin
from wsi_assist.stain import StainVectors, default_vectors
from wsi_assist.stream import stream
from wsi_assist.tiling import grid as make_grid

SHARED = Path(__file__).resolve().parents[2] / "shared" / "slides"
KI67 = SHARED / "OS-2-vsi-Ki67.ome.tif"
#: QuPath 0.3.2 on OS-2-vsi-Ki67.ome.tif: (detection threshold, DAB threshold) ->
#: (cells, positive %), from ../shared/slides/README.md.
QUPATH = {(0.2, 0.2): (1353, 13.5), (0.2, 0.5): (1353, 3.7), (0.4, 0.2): (763, 24.0),
          (0.4, 0.5): (763, 6.6)}
#: Published QuPath results by image name (the ndpi crop: OS-2-ndpi-results.tsv).
PUBLISHED_RESULTS = {
    "OS-2-vsi-Ki67.ome.tif": QUPATH, "OS-2-vsi.ome.tif": QUPATH,
    "OS-2-ndpi.ome.tif": {(0.2, 0.2): (1323, 16.6), (0.2, 0.5): (1323, 11.9),
                          (0.4, 0.2): (1066, 20.5), (0.4, 0.5): (1066, 14.7)}}
PUBLISHED = {"detectionImageBrightfield": "Optical density sum",
             "requestedPixelSizeMicrons": 0.5, "backgroundRadiusMicrons": 0.0,
             "medianRadiusMicrons": 0.0, "sigmaMicrons": 2.0, "minAreaMicrons": 10.0,
             "maxAreaMicrons": 400.0, "maxBackground": 2.0, "watershedPostProcess": True,
             "smoothBoundaries": True, "thresholdCompartment": "Nucleus: DAB OD mean",
             "singleThreshold": True}


def params_for(kind: str, detection: float | None, dab: float | None) -> NucleiParams:
    base = (config.load().nuclei.model_dump() if kind == "default"
            else {**NucleiParams().model_dump(), **PUBLISHED})
    if detection is not None:
        base["threshold"] = detection
    if dab is not None:
        base["thresholdPositive1"] = dab
        if not base["singleThreshold"]:
            base["thresholdPositive2"] = max(base["thresholdPositive2"], dab)
            base["thresholdPositive3"] = max(base["thresholdPositive3"], dab)
    return NucleiParams(**base)


def whole_image(path: Path, mpp: float | None, stains: StainVectors, params: NucleiParams
                ) -> tuple[nu.Nuclei, float, dict[str, Any]]:
    """Nuclei of every tile of the image (level-0 px), the image area (mm^2) and timings."""
    info = describe(path, mpp_override=mpp) if mpp else describe(path)
    w, h = info.level_dimensions[0]
    use_mpp = info.require_mpp()
    grid = make_grid(info, shapely.box(0, 0, w, h), TilingParams(min_tissue=0.0))
    blocks, block_of = builtin.analysis_grid(grid, params)
    t0 = time.perf_counter()
    found = builtin.analyse(stream(path, blocks, batch_size=builtin.BATCH), grid, blocks,
                            block_of, stains, params, info.level_dimensions[grid.level])
    seconds = time.perf_counter() - t0
    return found, w * h * use_mpp**2 / 1e6, {"tiles": len(grid), "blocks": len(blocks),
                                            "seconds": seconds,
                                            "tiles_per_s": len(grid) / seconds,
                                            "mpp": use_mpp, "analysis_mpp":
                                            blocks.delivered_mpp}


def one_piece(path: Path, mpp: float, stains: StainVectors, params: NucleiParams
              ) -> nu.Nuclei:
    """The whole image analysed at once (no tiles)."""
    from wsi_assist.slide import open_slide

    with open_slide(path) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions, as_array=True))[..., :3]
    return nu.detect_nuclei(np.ascontiguousarray(rgb), mpp, stains, params)


def result(found: nu.Nuclei, pos: nu.Positivity, area_mm2: float) -> dict[str, Any]:
    s = nu.summary(found, pos, area_mm2)
    return {"n_cells": s["n_cells"], "n_positive": s["n_positive"],
            "positive_percent": None if s["positive_percent"] is None
            else round(s["positive_percent"], 2),
            "h_score": None if s["h_score"] is None else round(s["h_score"], 1),
            "area_mm2": round(area_mm2, 4),
            "density_per_mm2": None if s["density_per_mm2"] is None
            else round(s["density_per_mm2"]),
            "median_nucleus_area_um2": None if s["median_nucleus_area_um2"] is None
            else round(s["median_nucleus_area_um2"], 2), "dab": s["dab"]}


def render(path: Path, found: nu.Nuclei, pos: nu.Positivity, out: Path) -> None:
    """The image with every outline drawn in its class colour."""
    from PIL import Image, ImageDraw

    from wsi_assist.slide import open_slide

    with open_slide(path) as s:
        img = Image.fromarray(np.asarray(s.read_region((0, 0), 0, s.dimensions,
                                                       as_array=True))[..., :3])
    draw = ImageDraw.Draw(img)
    # unscored nuclei in green: QuPath's blue-grey is invisible on haematoxylin
    colors = pos.colors if pos.applicable else ((0, 230, 0),)
    for i in range(len(found)):
        ring = [tuple(p) for p in found.outline(i).tolist()]
        draw.polygon(ring, outline=tuple(colors[int(pos.labels[i])]), width=2)
    img.save(out)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", nargs="?", type=Path)
    ap.add_argument("--mpp", type=float)
    ap.add_argument("--detection-threshold", type=float)
    ap.add_argument("--dab-threshold", type=float)
    ap.add_argument("--params", choices=("published", "default"), default="published")
    ap.add_argument("--stains", choices=("hdab", "he"), default="hdab")
    ap.add_argument("--png", type=Path, help="draw the outlines over the image")
    args = ap.parse_args()
    stains = default_vectors("brightfield-hdab" if args.stains == "hdab" else "brightfield-he")
    image = args.image if args.image is not None else KI67
    single = (args.detection_threshold is not None or args.dab_threshold is not None
              or image.name not in PUBLISHED_RESULTS or args.png is not None)
    if single:
        params = params_for(args.params, args.detection_threshold, args.dab_threshold)
        found, area, t = whole_image(image, args.mpp, stains, params)
        pos = nu.score_positivity(found, stains, params)
        if args.png:
            render(image, found, pos, args.png)
        print(f"{image.name}: {t['tiles']} tiles at {t['analysis_mpp']:.4f} um/px, "
              f"{t['tiles_per_s']:.1f} tiles/s")
        print(json.dumps({**result(found, pos, area), "parameters": params.qupath()}))
        return
    if not image.is_file():
        sys.exit(f"{image} not found: give an IMAGE")
    table = PUBLISHED_RESULTS[image.name]
    rows, last = [], {}
    print(f"{image.name}, settings of the published QuPath 0.3.2 comparison "
          f"({', '.join(f'{k} {v}' for k, v in PUBLISHED.items())})")
    print("| detection threshold | DAB threshold | QuPath cells | ours | diff | "
          "QuPath positive % | ours | diff | ours in one piece (cells, %) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for det in (0.2, 0.4):
        params = params_for("published", det, None)
        found, area, t = whole_image(image, args.mpp, stains, params)
        whole = one_piece(image, t["mpp"], stains, params)
        for dab in (0.2, 0.5):
            p = params_for("published", det, dab)
            pos = nu.score_positivity(found, stains, p)
            pos1 = nu.score_positivity(whole, stains, p)
            res = result(found, pos, area)
            qc, qp = table[(det, dab)]
            rows.append({"detection_threshold": det, "dab_threshold": dab,
                         "qupath": {"n_cells": qc, "positive_percent": qp}, **res})
            pp = res["positive_percent"]
            print(f"| {det} | {dab} | {qc} | {res['n_cells']} | "
                  f"{100 * (res['n_cells'] - qc) / qc:+.1f}% | {qp} | {pp:.1f} | "
                  f"{pp - qp:+.1f} | {len(whole)}, {pos1.positive_percent:.1f} |")
            last = res
        print(f"(detection threshold {det}: {t['tiles']} tiles, {t['tiles_per_s']:.1f} "
              f"tiles/s)")
    ok = all(abs(r["n_cells"] - r["qupath"]["n_cells"]) <= 0.2 * r["qupath"]["n_cells"]
             and abs(r["positive_percent"] - r["qupath"]["positive_percent"]) <= 3
             for r in rows)
    print(f"target (cells within 20%, positive % within 3 points): "
          f"{'met' if ok else 'NOT met'}")
    print(json.dumps({**last, "settings": rows, "target_met": ok}))


if __name__ == "__main__":
    main()
