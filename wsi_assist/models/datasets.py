"""Labelled patches of a zero-shot benchmark, read from the dataset's released files.

A prompt set names its ``dataset.layout``; :func:`read` turns the folder (or file) a user
gives into image sources and class indices in that prompt set. Released label names
(folder names, CSV labels, HDF5 label values) map to classes by name or alias.

=========== ==================================================================================
layout      released files
=========== ==================================================================================
folders     one folder per class, found up to three levels down (CRC-100K
            ``NCT-CRC-HE-100K/<CLASS>/*.tif``, LC25000 ``lung_image_sets/lung_aca/*.jpeg``,
            BACH ``Photos/<class>/*.tif``)
pcam_h5     ``camelyonpatch_level_2_split_test_x.h5`` (``x``) and ``..._test_y.h5`` (``y``)
wsss4luad   ``1.training/*-[tumor, stroma, normal].png``; tumour flag 1 -> "tumor", else
            "normal" (the published binary split)
sicapv2     ``partition/Test/Test.xlsx`` (image_name, NC, G3, G4, G5, G4C) + ``images/``;
            rows with exactly one of NC/G3/G4/G5
skin_csv    a CSV with columns ``file``, ``class``, ``set``; rows whose set is ``Test``;
            ``file`` relative to the CSV's folder or one of the two above it
osteo       ``PathologistValidation.csv`` files (no header: image name, label) next to the
            ``*.jpg`` tiles they label
=========== ==================================================================================
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.errors import WsiAssistError
from wsi_assist.models.zeroshot import PromptSet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
PCAM_FILE = "camelyonpatch_level_2_split_{split}_{xy}.h5"
SICAP_LABELS = ("NC", "G3", "G4", "G5")
_WSSS_LABEL = re.compile(r"\[\s*([01])\s*,\s*([01])\s*,\s*([01])\s*\]$")


@dataclass
class Patches:
    """Class indices of N patches and a way to read them as RGB PIL images."""

    labels: np.ndarray
    labels_found: dict[str, str]  # released label -> class name
    read: Callable[[int, int], list[Any]]  # (start, stop) -> PIL images
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[list[Any]]:
        for i in range(0, len(self), batch_size):
            yield self.read(i, min(i + batch_size, len(self)))


def read(root: Path, prompts: PromptSet) -> Patches:
    """The benchmark at ``root`` in the layout ``prompts.layout``; errors name the file."""
    root = Path(root).expanduser()
    if not root.exists():
        raise WsiAssistError(f"{root}: not found")
    readers = {"folders": read_folders, "pcam_h5": read_pcam, "wsss4luad": read_wsss4luad,
               "sicapv2": read_sicapv2, "skin_csv": read_skin_csv, "osteo": read_osteo}
    patches = readers[prompts.layout](root, prompts)
    if not len(patches):
        raise WsiAssistError(f"{root}: no labelled patches found ({prompts.layout} layout)")
    return patches


def _from_files(pairs: list[tuple[Path, str]], prompts: PromptSet, where: Path) -> Patches:
    """(image path, released label) pairs -> Patches; an unknown label is an error."""
    index: dict[str, int] = {}
    for label in sorted({lab for _, lab in pairs}):
        i = prompts.class_index(label)
        if i is None:
            raise WsiAssistError(f"{where}: label {label!r} matches no class of prompt set "
                                 f"{prompts.name!r} ({', '.join(prompts.names)}); add it "
                                 "as an alias")
        index[label] = i
    paths = [p for p, _ in pairs]
    counts = Counter(lab for _, lab in pairs)
    log.info("%s: %d patches; %s", where, len(paths),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    def load(start: int, stop: int) -> list[Any]:
        return [_open_rgb(p) for p in paths[start:stop]]

    return Patches(np.asarray([index[lab] for _, lab in pairs], np.int64),
                   {lab: prompts.classes[i].name for lab, i in index.items()}, load, paths)


def _open_rgb(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise WsiAssistError(f"{path}: cannot read the image ({e})") from e


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                  and f.is_file())


def read_folders(root: Path, prompts: PromptSet) -> Patches:
    """One subfolder per class. The first level (up to three down) where some folder is
    named after a class is used; every sibling there must then be a class too."""
    if not root.is_dir():
        raise WsiAssistError(f"{root}: not a folder of class subfolders")
    level = [root]
    for _ in range(4):
        found, unmapped = _class_folders(level, prompts)
        parents = sorted({str(d.parent) for d in found})
        if len(parents) > 1:
            raise WsiAssistError(f"{root}: class folders under several folders "
                                 f"({', '.join(parents)}), e.g. a training and a test split; "
                                 "point at one of them")
        if found:
            if unmapped:
                raise WsiAssistError(
                    f"{root}: subfolders {unmapped!r} match no class of prompt set "
                    f"{prompts.name!r} ({', '.join(prompts.names)}); rename them or add "
                    "aliases to the prompt set")
            pairs = [(f, d.name) for d in found for f in _images(d)]
            return _from_files(pairs, prompts, root)
        level = [d for p in level for d in sorted(p.iterdir()) if d.is_dir()]
    raise WsiAssistError(f"{root}: no subfolder named after a class of prompt set "
                         f"{prompts.name!r} ({', '.join(prompts.names)} or their aliases)")


def _class_folders(parents: list[Path], prompts: PromptSet) -> tuple[list[Path], list[str]]:
    found: list[Path] = []
    unmapped: list[str] = []
    for parent in parents:
        subs = sorted(d for d in parent.iterdir() if d.is_dir())
        hits = [d for d in subs if prompts.class_index(d.name) is not None]
        if hits:
            found += hits
            unmapped += [d.name for d in subs if d not in hits]
    return found, unmapped


def read_pcam(root: Path, prompts: PromptSet, split: str = "test") -> Patches:
    """PCam's HDF5 pair; ``root`` is their folder or the ``_x.h5`` file."""
    folder = root.parent if root.is_file() else root
    x_path = folder / PCAM_FILE.format(split=split, xy="x")
    y_path = folder / PCAM_FILE.format(split=split, xy="y")
    for p in (x_path, y_path):
        if not p.is_file():
            gz = p.with_name(p.name + ".gz")
            hint = f"; found {gz.name}: gunzip it first" if gz.is_file() else ""
            raise WsiAssistError(f"{p}: PCam file not found{hint}")
    h5py = _need("h5py", x_path)
    try:
        with h5py.File(y_path, "r") as f:
            y = np.asarray(f["y"]).reshape(-1).astype(np.int64)
        with h5py.File(x_path, "r") as f:
            n, shape = len(f["x"]), f["x"].shape
    except (OSError, KeyError) as e:
        raise WsiAssistError(f"{x_path.parent}: not a PCam HDF5 pair ({e})") from e
    if len(shape) != 4 or shape[-1] != 3 or n != len(y):
        raise WsiAssistError(f"{x_path}: x is {shape}, y has {len(y)} labels; expected "
                             "(N, 96, 96, 3) images and N labels")
    index = {}
    for v in np.unique(y):
        i = prompts.class_index(str(int(v)))
        if i is None:
            raise WsiAssistError(f"{y_path}: label {int(v)} matches no class of prompt set "
                                 f"{prompts.name!r}; add \"{int(v)}\" as an alias")
        index[int(v)] = i

    def load(start: int, stop: int) -> list[Any]:
        from PIL import Image

        with h5py.File(x_path, "r") as f:
            block = np.asarray(f["x"][start:stop])
        return [Image.fromarray(a) for a in block]

    labels = np.asarray([index[int(v)] for v in y], np.int64)
    return Patches(labels, {str(v): prompts.classes[i].name for v, i in index.items()}, load)


def read_wsss4luad(root: Path, prompts: PromptSet) -> Patches:
    """``1.training/*-[a, b, c].png``: "tumor" when a (the tumour flag) is 1, else "normal"."""
    folder = root / "1.training" if (root / "1.training").is_dir() else root
    pairs = []
    for f in sorted(folder.glob("*.png")):
        m = _WSSS_LABEL.search(f.stem)
        if m is None:
            raise WsiAssistError(f"{f}: no [tumor, stroma, normal] label at the end of the "
                                 "file name (WSSS4LUAD 1.training layout)")
        pairs.append((f, "tumor" if m.group(1) == "1" else "normal"))
    return _from_files(pairs, prompts, folder)


def read_sicapv2(root: Path, prompts: PromptSet) -> Patches:
    """The Test partition; rows with exactly one Gleason label (G4C ignored)."""
    table = root / "partition" / "Test" / "Test.xlsx"
    if not table.is_file() and table.with_suffix(".csv").is_file():
        table = table.with_suffix(".csv")
    rows = _read_table(table)
    pairs = []
    for row in rows:
        try:
            flags = [int(float(row[k] or 0)) for k in SICAP_LABELS]
            name = str(row["image_name"])
        except (KeyError, ValueError) as e:
            raise WsiAssistError(f"{table}: needs columns image_name, NC, G3, G4, G5 "
                                 f"with 0/1 values ({e})") from e
        if sum(flags) == 1:
            pairs.append((root / "images" / name, SICAP_LABELS[flags.index(1)]))
    _check_exist([p for p, _ in pairs], table)
    return _from_files(pairs, prompts, table)


def _read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of an .xlsx (first sheet) or .csv file as dicts keyed by the header."""
    if not path.is_file():
        raise WsiAssistError(f"{path}: partition file not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    openpyxl = _need("openpyxl", path)
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        values = list(book.worksheets[0].iter_rows(values_only=True))
    except (OSError, KeyError, ValueError) as e:
        raise WsiAssistError(f"{path}: cannot read the spreadsheet ({e})") from e
    if not values:
        return []
    header = [str(h) for h in values[0]]
    return [dict(zip(header, r, strict=False)) for r in values[1:]]


def read_skin_csv(root: Path, prompts: PromptSet, split: str = "Test") -> Patches:
    """The rows of ``split`` in the dataset CSV (``root`` is the CSV or its folder)."""
    table = root if root.is_file() else _find_csv(root, {"file", "class", "set"})
    rows = [r for r in _read_table(table) if str(r.get("set")) == split]
    base = _base_folder(table, [str(r["file"]) for r in rows[:20]])
    pairs = [(base / str(r["file"]), str(r["class"])) for r in rows]
    _check_exist([p for p, _ in pairs], table)
    return _from_files(pairs, prompts, table)


def _base_folder(table: Path, files: list[str]) -> Path:
    """The folder the CSV's relative paths start from: its own or up to two above it."""
    for base in [table.parent, *table.parent.parents][:3]:
        if files and all((base / f).is_file() for f in files):
            return base
    return table.parent


def _find_csv(root: Path, columns: set[str]) -> Path:
    for path in sorted(root.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            header = set(next(csv.reader(f), []))
        if columns <= header:
            return path
    raise WsiAssistError(f"{root}: no CSV with columns {', '.join(sorted(columns))}")


def _key(name: str) -> str:
    """Image names as Osteo's CSVs and file names spell them (spaces vs dashes)."""
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    return re.sub(r"[\s_-]+", "-", stem.strip().lower())


def read_osteo(root: Path, prompts: PromptSet) -> Patches:
    """Tiles labelled by the ``PathologistValidation.csv`` beside them."""
    tables = sorted(root.rglob("PathologistValidation.csv"))
    if not tables:
        raise WsiAssistError(f"{root}: no PathologistValidation.csv (Osteosarcoma Tumor "
                             "Assessment layout)")
    pairs = []
    for table in tables:
        files = {_key(f.name): f for f in table.parent.glob("*.jpg")}
        with table.open(newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if len(r) >= 2]
        missing = [r[0] for r in rows if _key(r[0]) not in files]
        if missing:
            log.warning("%s: %d labelled images not beside it, e.g. %s", table,
                        len(missing), missing[0])
        pairs += [(files[_key(r[0])], r[1].strip()) for r in rows if _key(r[0]) in files]
    return _from_files(pairs, prompts, root)


def _check_exist(paths: list[Path], table: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise WsiAssistError(f"{table}: {len(missing)} listed images are missing, e.g. "
                             f"{missing[0]}")


def _need(module: str, path: Path) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise WsiAssistError(f"{path}: reading it needs {module} (pip install "
                             f"{module})") from None
