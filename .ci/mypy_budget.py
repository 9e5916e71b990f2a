"""Run mypy (settings from pyproject.toml) and hold the error count to a budget.

Prints the errors per file and the total. Exits non-zero when the total exceeds the
number in .ci/mypy-baseline.txt, or when any error is in a file that must stay clean
(PROTECTED below; such files may not exist yet). When the total drops below the
baseline it says so: lower the baseline in the same commit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
#: Files (or folders, ending in "/") that must have no mypy errors at all.
PROTECTED = ("wsi_assist/settings.py", "wsi_assist/store.py", "wsi_assist/stages/")
ERROR = re.compile(r"^(?P<path>[^:\n]+?):(?P<line>\d+)(?::\d+)?: error: ")
SUMMARY = re.compile(r"^Found (?P<n>\d+) errors? in ")


def read_baseline(path: Path = BASELINE) -> int:
    """The single integer in ``path``, skipping blank and ``#`` comment lines."""
    values = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    if len(values) != 1 or not values[0].isdigit():
        raise ValueError(f"{path}: expected one non-negative integer, got {values!r}")
    return int(values[0])


def parse_errors(output: str) -> list[tuple[str, str]]:
    """(path, full line) for each ``path:line: error:`` line of mypy's output."""
    out = []
    for line in output.splitlines():
        m = ERROR.match(line)
        if m:
            out.append((m["path"].replace("\\", "/").removeprefix("./"), line))
    return out


def is_protected(path: str) -> bool:
    return any(path.startswith(p) if p.endswith("/") else path == p for p in PROTECTED)


def main() -> int:
    try:
        baseline = read_baseline()
    except (OSError, ValueError) as e:
        print(f"mypy budget: cannot read the baseline ({e})")
        return 2
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-color-output"], cwd=ROOT,
                          capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    errors = parse_errors(output)
    found = [int(m["n"]) for ln in output.splitlines() if (m := SUMMARY.match(ln))]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not errors):
        print(output.rstrip())
        print(f"mypy budget: mypy did not run cleanly (exit status {proc.returncode})")
        return 2
    if found and found[-1] != len(errors):
        print(output.rstrip())
        print(f"mypy budget: parsed {len(errors)} error lines but mypy reports {found[-1]}")
        return 2

    per_file = Counter(path for path, _ in errors)
    total = len(errors)
    print("mypy errors per file:")
    for path, n in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:5d}  {path}")
    print(f"  {total:5d}  total (baseline {baseline})")
    for p in PROTECTED:
        state = "present" if (ROOT / p).exists() else "not present yet"
        print(f"  must stay at zero: {p} ({state})")

    protected = [line for path, line in errors if is_protected(path)]
    problems = []
    if protected:
        print("\nErrors in files that must stay clean:")
        print("\n".join(f"  {line}" for line in protected))
        problems.append(f"{len(protected)} in files that must stay at zero")
    if total > baseline:
        print(f"\nThe total ({total}) exceeds the baseline ({baseline}); all errors:")
        print("\n".join(f"  {line}" for _, line in errors))
        problems.append(f"total {total} over the baseline {baseline}")
    elif total < baseline:
        print(f"\nHint: {baseline - total} fewer than the baseline. Lower "
              f"{BASELINE.relative_to(ROOT)} to {total} in this commit so the budget "
              "only goes down.")
    if problems:
        print(f"mypy budget: FAIL ({'; '.join(problems)})")
        return 1
    print(f"mypy budget: ok ({total} of {baseline} allowed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
