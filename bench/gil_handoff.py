"""What two threads lose to CPython's GIL on numpy copies the size of the stream's pieces.

    python3 bench/gil_handoff.py [--seconds 0.5]

numpy releases the GIL for a copy of 500 elements or more and takes it back after. When
the other thread holds it then, the copying thread waits for a hand-over. Each row
times one thread copying pieces of one size in a loop, then two threads doing the same
at once, and prints the two threads' copies per second over one thread's (2.0 would be
two cores' worth). The stream's scatter copies pieces of 10-150 k elements (a 128 x 100
px piece of a 1/2-scale unit is 38 k); one under 500 elements keeps the GIL and is the
control. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable

import numpy as np

#: (rows, columns) of the RGB pieces timed, with their element counts in the name.
PIECES = {"390 (GIL kept)": (10, 13), "10 k": (56, 60), "38 k": (128, 100),
          "150 k": (224, 224)}


def copies_per_s(copy: Callable[[], None], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        copy()
        n += 1
    return n / (time.perf_counter() - t0)


def two_over_one(rows: int, cols: int, seconds: float) -> tuple[float, float]:
    """(microseconds per copy, one thread; two threads' copies/s over one thread's)."""
    src = np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
    dsts = [np.zeros((rows, cols, 3), np.uint8) for _ in range(2)]

    def copier(k: int) -> Callable[[], None]:
        def copy() -> None:
            dsts[k][...] = src[7:7 + rows, 5:5 + cols]
        return copy

    one = copies_per_s(copier(0), seconds)
    rates: list[float] = []
    threads = [threading.Thread(target=lambda k=k: rates.append(
        copies_per_s(copier(k), seconds))) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1e6 / one, sum(rates) / one


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5)
    a = ap.parse_args(argv)
    out: dict[str, object] = {}
    for name, (rows, cols) in PIECES.items():
        us, ratio = two_over_one(rows, cols, a.seconds)
        print(f"{name:>15} elements: {us:6.2f} us a copy on one thread; two threads "
              f"{ratio:.2f}x one")
        out[name] = {"us_per_copy": round(us, 2), "two_threads_over_one": round(ratio, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
