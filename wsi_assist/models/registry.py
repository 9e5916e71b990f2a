"""Models ``wsi-assist models pull NAME`` knows: name -> Hugging Face repo, files, kind.

``files`` are file names or glob patterns in the repo (``*.safetensors`` for sharded
weights). ``verified`` is True only where the repo id was seen in the authors' own README
or public code that loads it; the others are the ids as commonly published and are marked
unverified (``wsi-assist models pull --list`` says so). ``gated`` repos need their licence
accepted on the hub and a token (``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

from dataclasses import dataclass

from wsi_assist.errors import ConfigError

#: kind -> how the project loads it once pulled ({path}: the file or folder pulled)
USE = {
    "open_clip_state_dict": "embed.model: ViT-B-16:{path} (PathCLIP: embed.pathclip: {path})",
    "open_clip_hub": "embed.model: {path} (an open_clip hub folder)",
    "transformers_clip": "embed.model: {path} (a transformers CLIPModel folder)",
    "image_encoder": "embed.model: {path} (image-only encoder: embeddings, no zero-shot)",
    "vlm": "caption.model: {path}",
    "llava_original": "wsi-assist models convert {path} -o DST, then caption.model: DST",
}


@dataclass(frozen=True)
class ModelEntry:
    """One pullable model."""

    name: str
    repo_id: str
    files: tuple[str, ...]
    kind: str
    gated: bool = False
    verified: bool = False
    license: str = ""

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1 and not any(c in self.files[0] for c in "*?[")

    def use(self, path: str) -> str:
        return USE[self.kind].format(path=path)


_HF_FOLDER = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")

MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("pathclip", "jamessyx/pathclip", ("pathclip-base.pt",), "open_clip_state_dict",
               verified=True, license="CC-BY-NC-4.0"),
    ModelEntry("pathgen-clip", "jamessyx/PathGen-CLIP", ("pathgenclip.pt",),
               "open_clip_state_dict", gated=True, verified=True),
    ModelEntry("pathgen-clip-l", "jamessyx/PathGen-CLIP-L", ("pathgenclip_l.pt",),
               "open_clip_state_dict", gated=True, verified=True),
    ModelEntry("pathgen-clip-l-hf", "jamessyx/pathgenclip-vit-large-patch14-hf", _HF_FOLDER,
               "transformers_clip", verified=True),
    ModelEntry("quiltnet-b-32", "wisdomik/QuiltNet-B-32",
               ("open_clip_config.json", "open_clip_pytorch_model.bin"), "open_clip_hub",
               verified=True),
    ModelEntry("quiltnet-b-16", "wisdomik/QuiltNet-B-16",
               ("open_clip_config.json", "open_clip_pytorch_model.bin"), "open_clip_hub"),
    ModelEntry("plip", "vinid/plip", ("*.json", "*.txt", "pytorch_model.bin"),
               "transformers_clip"),
    ModelEntry("patho-clip-l", "WenchuanZhang/Patho-CLIP-L", ("*",), "open_clip_state_dict",
               verified=True),
    ModelEntry("conch", "MahmoodLab/CONCH", ("pytorch_model.bin",), "image_encoder",
               gated=True, verified=True, license="CC-BY-NC-ND-4.0"),
    ModelEntry("musk", "xiangjx/musk", ("*",), "image_encoder", gated=True, verified=True),
    ModelEntry("uni", "MahmoodLab/UNI", ("pytorch_model.bin",), "image_encoder", gated=True),
    ModelEntry("uni2-h", "MahmoodLab/UNI2-h", ("pytorch_model.bin",), "image_encoder",
               gated=True),
    ModelEntry("virchow2", "paige-ai/Virchow2", ("config.json", "pytorch_model.bin"),
               "image_encoder", gated=True, verified=True),
    ModelEntry("h-optimus-0", "bioptimus/H-optimus-0", ("config.json", "*.safetensors"),
               "image_encoder", gated=True),
    ModelEntry("h-optimus-1", "bioptimus/H-optimus-1", ("config.json", "*.safetensors"),
               "image_encoder", gated=True),
    ModelEntry("prov-gigapath", "prov-gigapath/prov-gigapath",
               ("config.json", "pytorch_model.bin"), "image_encoder", gated=True),
    ModelEntry("phikon-v2", "owkin/phikon-v2", ("config.json", "model.safetensors"),
               "image_encoder"),
    ModelEntry("pathgen-llava", "jamessyx/PathGen-LLaVA", _HF_FOLDER + ("*.bin",),
               "llava_original", verified=True),
    ModelEntry("llava-med", "microsoft/llava-med-v1.5-mistral-7b", _HF_FOLDER + ("*.bin",),
               "llava_original"),
    ModelEntry("quilt-llava", "wisdomik/Quilt-Llava-v1.5-7b", _HF_FOLDER + ("*.bin",),
               "llava_original"),
    ModelEntry("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", _HF_FOLDER, "vlm"),
    ModelEntry("medgemma-4b", "google/medgemma-4b-it", _HF_FOLDER, "vlm", gated=True),
    ModelEntry("patho-r1-7b", "WenchuanZhang/Patho-R1-7B", _HF_FOLDER, "vlm"),
)


def names() -> list[str]:
    return [m.name for m in MODELS]


def get(name: str) -> ModelEntry:
    """The entry called ``name`` (case-insensitive), or a one-line error listing them."""
    for m in MODELS:
        if m.name == name.casefold():
            return m
    raise ConfigError(f"models pull: no model {name!r}; known: {', '.join(names())}")
