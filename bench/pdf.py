"""Report PDFs: one Chromium per page (as ``wsi-assist report`` does) against the batch's
one Chromium (``report.browser``), in the same process, on the same pages.

    python3 bench/pdf.py [--pages 7] [--html OUT/<slide-id>/report.html]

Pages are a report's HTML (``--html``; copied ``--pages`` times) or a small page with a
picture. Prints seconds per page both ways, their ratio and how many Chromium processes
the batch started; the last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from wsi_assist.report import browser, pdf

log = logging.getLogger("bench.pdf")


def make_pages(folder: Path, n: int, html: Path | None) -> list[Path]:
    pages = []
    for i in range(n):
        d = folder / f"slide-{i}"
        if html is not None:
            shutil.copytree(html.parent, d)
            pages.append(d / html.name)
            continue
        d.mkdir()
        pic = np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pic).save(d / "pic.png")
        (d / "report.html").write_text(
            f"<!doctype html><title>slide {i}</title><h1>Slide {i}</h1>"
            "<img src='pic.png'>" + "<p>Draft for research use.</p>" * 40, "utf-8")
        pages.append(d / "report.html")
    return pages


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=7)
    ap.add_argument("--html", type=Path, help="a report.html to print (its folder copied)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if pdf.find_browser() is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="wsi-bench-pdf-") as tmp:
        pages = make_pages(Path(tmp), a.pages, a.html)
        t = time.perf_counter()
        notes = [pdf.write_pdf(p, p.with_name("each.pdf"), Path(tmp)) for p in pages]
        each = (time.perf_counter() - t) / len(pages)
        b = pdf.batch_browser(Path(tmp) / ".work")
        t = time.perf_counter()
        with browser.shared(b):
            notes += [pdf.write_pdf(p, p.with_name("batch.pdf")) for p in pages]
        batch = (time.perf_counter() - t) / len(pages)
        sizes = [p.with_name("batch.pdf").stat().st_size for p in pages]
    out = {"pages": len(pages), "per_page_s": round(each, 3), "batch_per_page_s":
           round(batch, 3), "speedup": round(each / batch, 2),
           "chromium_starts": b.starts if b is not None else None,
           "all_written": all(n == "written" for n in notes), "pdf_bytes": min(sizes)}
    log.info("one Chromium per page %.2f s/page; one per batch %.2f s/page (%.1fx), "
             "%s start(s)", each, batch, each / batch, out["chromium_starts"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
