"""tiatoolbox's Otsu tissue mask + patch grid on slides, timed step by step (a peer of
``bench/tissue.py``; run by it with ``--peer tiatoolbox``, in this interpreter or, with
``--peer-python``, in another one where tiatoolbox is installed).

    python3 bench/peer_tiatoolbox.py SLIDE [--rounds R] [--min-mask-ratio F] [--mask-mpp M]
                                     [--read]
    python3 bench/peer_tiatoolbox.py --serve   (one round per stdin line "SLIDE MPP RATIO")

Steps, as tiatoolbox's documentation runs them: ``open`` (``WSIReader.open``),
``mask`` (``wsi.tissue_mask(method="otsu")``, its default 1.25x overview), ``grid``
(``SlidingWindowPatchExtractor`` at 0.5 um/px, 224 px patches, stride 224, that mask,
``min_mask_ratio`` as our ``tiling.min_tissue``). With ``--mask-mpp`` the same again with
the mask at that um/px (``*_matched``: our overview's resolution, for a like-for-like
figure). ``--read`` also reads every patch of the grid (``read``: iterating the
extractor, as a model's data loop would; run by ``bench/pipeline.py``). Medians over
rounds; the last line is a JSON list, one object per slide.
Imports only tiatoolbox (and numpy)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def one_round(path: Path, min_ratio: float, mask_mpp: float | None, read: bool = False
              ) -> dict[str, Any]:
    row = timed(path, min_ratio, None, read)
    if mask_mpp:
        row |= {f"{k}_matched": v for k, v in timed(path, min_ratio, mask_mpp, read).items()}
    return row


def timed(path: Path, min_ratio: float, mask_mpp: float | None, read: bool = False
          ) -> dict[str, Any]:
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor
    from tiatoolbox.wsicore.wsireader import WSIReader

    t0 = time.perf_counter()
    wsi = WSIReader.open(path)
    t1 = time.perf_counter()
    mask = (wsi.tissue_mask(method="otsu") if mask_mpp is None else
            wsi.tissue_mask(method="otsu", resolution=mask_mpp, units="mpp"))
    t2 = time.perf_counter()
    ex = SlidingWindowPatchExtractor(input_img=wsi, patch_size=(224, 224), input_mask=mask,
                                     resolution=0.5, units="mpp", stride=(224, 224),
                                     min_mask_ratio=min_ratio)
    t3 = time.perf_counter()
    row = {"open": t1 - t0, "mask": t2 - t1, "grid": t3 - t2, "total": t3 - t0,
           "tiles": len(ex), "mask_px": list(mask.img.shape[:2]),
           "mask_fraction": float(np.asarray(mask.img, bool).mean())}
    if read:
        n = sum(1 for patch in ex if patch.shape[:2] == (224, 224))
        t4 = time.perf_counter()
        row |= {"read": t4 - t3, "total": t4 - t0, "read_tiles": n}
    return row


def serve() -> None:
    """Rounds on request, so that a caller can interleave them with its own."""
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        path, mpp, ratio = line.rsplit(maxsplit=2)
        print(json.dumps(one_round(Path(path), float(ratio), float(mpp) or None)), flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="*", type=Path)
    ap.add_argument("--serve", action="store_true",
                    help="answer rounds asked on stdin with a JSON line each")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-mask-ratio", type=float, default=0.25)
    ap.add_argument("--mask-mpp", type=float, help="also the mask at this um/px")
    ap.add_argument("--read", action="store_true", help="also read every patch")
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    if a.serve:
        serve()
        return []
    out = []
    for p in a.slides:
        rows = [one_round(p, a.min_mask_ratio, a.mask_mpp, a.read) for _ in range(a.rounds)]
        res: dict[str, Any] = {"slide": p.name}
        for k, v in rows[0].items():
            if not isinstance(v, float) or k.startswith("mask_fraction"):
                res[k] = round(v, 4) if isinstance(v, float) else v
            else:
                res[f"{k}_s"] = round(float(np.median([r[k] for r in rows])), 4)
        out.append(res)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
