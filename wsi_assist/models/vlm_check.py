"""The cheap check of a captioner or summary model folder, for `wsi-assist models`: its
config.json names an architecture the loader builds, the weight files the index names are
all there with intact headers, and the tokenizer (or processor, with its chat template)
loads. No weights are read, so a 7B model is checked in about a second."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_assist.errors import ModelError

#: weight indexes (sharded checkpoints) and single weight files, as save_pretrained writes
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def quick_check(spec: str, what: str, summary: bool = False) -> str:
    """What the check found, in one line; ModelError naming the problem otherwise.

    ``summary``: a causal LM with a tokenizer (``caption.summary_model``); else an
    image-text-to-text model with a processor and a chat template (``caption.model``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from wsi_assist.models.captioner import check_architecture, load_pretrained, load_processor

    folder = local_folder(spec, what)
    if folder is None:
        return "hub id not in the local Hugging Face cache: not checked (--load loads it)"
    if not (folder / "config.json").is_file():
        raise ModelError(f"{what} {spec!r}: no config.json in {folder}")
    loader = AutoModelForCausalLM if summary else AutoModelForImageTextToText
    check_architecture(str(folder), loader, what)
    model_type = _model_type(folder)
    files, n_tensors = weight_files(folder, spec, what)
    if summary:
        from transformers import AutoTokenizer

        load_pretrained(str(folder), AutoTokenizer, what)
        text = "tokenizer"
    else:
        load_processor(str(folder), what)
        text = "processor, tokenizer and chat template"
    tensors = f", {n_tensors} tensors" if n_tensors is not None else ""
    size = sum(f.stat().st_size for f in files) / 1e9
    return (f"checked (not loaded; --load loads it): {model_type}, {len(files)} weight "
            f"file(s), {size:.2f} GB{tensors}; {text} read")


def local_folder(spec: str, what: str) -> Path | None:
    """The folder of ``spec``: a local folder, or a hub id's snapshot in the local
    Hugging Face cache (None when not cached; nothing is downloaded)."""
    from wsi_assist.models.captioner import looks_local

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if looks_local(spec):
        raise ModelError(f"{what} {spec!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (OSError, ValueError):
        return None


def weight_files(folder: Path, spec: str, what: str) -> tuple[list[Path], int | None]:
    """The weight files of ``folder`` (from its index when sharded) and how many tensors
    they hold (None for pickled .bin files, which are not opened). ModelError when the
    index names missing files or a safetensors header is cut or unreadable."""
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            return _sharded(folder, index, spec, what)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            keys = _safetensors_keys(path, spec, what) if name.endswith(".safetensors") \
                else None
            return [path], None if keys is None else len(keys)
    raise ModelError(f"{what} {spec!r}: no weight files in {folder} (expected "
                     f"{', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})")


def _sharded(folder: Path, index: str, spec: str, what: str
             ) -> tuple[list[Path], int | None]:
    try:
        weight_map = json.loads((folder / index).read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{what} {spec!r}: {index} is not a weight index ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{what} {spec!r}: {index} has no weight_map")
    shards = sorted({str(v) for v in weight_map.values()})
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ModelError(f"{what} {spec!r}: {index} names weight files that are missing: "
                         f"{', '.join(missing)}")
    for shard in shards:
        if not shard.endswith(".safetensors"):
            continue
        listed = {k for k, v in weight_map.items() if v == shard}
        absent = listed - _safetensors_keys(folder / shard, spec, what)
        if absent:
            raise ModelError(f"{what} {spec!r}: {shard} lacks {len(absent)} tensors that "
                             f"{index} puts there (e.g. {min(absent)})")
    return [folder / s for s in shards], len(weight_map)


def _safetensors_keys(path: Path, spec: str, what: str) -> set[str]:
    """The tensor names in a safetensors file's header (the data is not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{what} {spec!r}: {path.name} is not a readable safetensors "
                         f"file ({e})") from e


def _model_type(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    return str(cfg.get("model_type") or next(iter(cfg.get("architectures") or []), "?"))
