"""Models ``wsi-assist models pull NAME`` knows: name -> Hugging Face repo, files, kind.

``files`` are file names or glob patterns in the repo (``*.safetensors`` for sharded
weights; patterns where the exact file names were not checked). ``verified`` is True only
where the repo id was seen in the authors' README or in public code that loads it from the
hub (checked through a code search, not against the hub itself, which is not reachable
here); ``wsi-assist models pull --list`` marks the others. ``gated`` repos need their
licence accepted on the hub and a token (``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

from dataclasses import dataclass

from wsi_assist.errors import ConfigError

#: kind -> how the project loads it once pulled ({path}: the file or folder pulled)
USE = {
    "pathclip": "embed.pathclip: {path}",
    "open_clip_state_dict": "embed.model: {arch}:{path}",
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
    arch: str = ""  # the open_clip architecture of a plain state_dict

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1 and not any(c in self.files[0] for c in "*?[")

    def use(self, path: str) -> str:
        return USE[self.kind].format(path=path, arch=self.arch or "ARCH")


_HF_FOLDER = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
_HF_LEGACY = _HF_FOLDER + ("*.bin",)
_TIMM = ("config.json", "*.safetensors", "*.bin")

MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("pathclip", "jamessyx/pathclip", ("pathclip-base.pt",), "pathclip",
               verified=True, license="CC-BY-NC-4.0"),
    ModelEntry("pathgen-clip", "jamessyx/PathGen-CLIP", ("*.pt",), "open_clip_state_dict",
               gated=True, verified=True, arch="ViT-B-16"),
    ModelEntry("pathgen-clip-l", "jamessyx/PathGen-CLIP-L", ("*.pt",),
               "open_clip_state_dict", gated=True, verified=True, arch="ViT-L-14"),
    ModelEntry("pathgen-clip-l-hf", "jamessyx/pathgenclip-vit-large-patch14-hf", _HF_LEGACY,
               "transformers_clip", verified=True),
    ModelEntry("quiltnet-b-32", "wisdomik/QuiltNet-B-32",
               ("open_clip_config.json", "open_clip_pytorch_model.bin"), "open_clip_hub",
               verified=True),
    ModelEntry("quiltnet-b-16", "wisdomik/QuiltNet-B-16",
               ("open_clip_config.json", "open_clip_pytorch_model.bin"), "open_clip_hub",
               verified=True),
    ModelEntry("plip", "vinid/plip", _HF_LEGACY, "transformers_clip", verified=True),
    ModelEntry("patho-clip-l", "WenchuanZhang/Patho-CLIP-L", ("*",), "open_clip_state_dict",
               verified=True, arch="ViT-L-14"),
    ModelEntry("conch", "MahmoodLab/CONCH", ("pytorch_model.bin",), "image_encoder",
               gated=True, verified=True, license="CC-BY-NC-ND-4.0"),
    ModelEntry("musk", "xiangjx/musk", ("*",), "image_encoder", gated=True, verified=True),
    ModelEntry("uni", "MahmoodLab/UNI", _TIMM, "image_encoder", gated=True, verified=True),
    ModelEntry("uni2-h", "MahmoodLab/UNI2-h", _TIMM, "image_encoder", gated=True,
               verified=True),
    ModelEntry("virchow2", "paige-ai/Virchow2", _TIMM, "image_encoder", gated=True,
               verified=True),
    ModelEntry("h-optimus-0", "bioptimus/H-optimus-0", _TIMM, "image_encoder", gated=True,
               verified=True),
    ModelEntry("h-optimus-1", "bioptimus/H-optimus-1", _TIMM, "image_encoder", gated=True,
               verified=True),
    ModelEntry("prov-gigapath", "prov-gigapath/prov-gigapath", _TIMM, "image_encoder",
               gated=True, verified=True),
    ModelEntry("phikon-v2", "owkin/phikon-v2", _TIMM, "image_encoder", verified=True),
    ModelEntry("pathgen-llava", "jamessyx/PathGen-LLaVA", _HF_LEGACY, "llava_original",
               verified=True),
    ModelEntry("llava-med", "microsoft/llava-med-v1.5-mistral-7b", _HF_LEGACY,
               "llava_original", verified=True),
    ModelEntry("quilt-llava", "wisdomik/Quilt-Llava-v1.5-7b", _HF_LEGACY, "llava_original",
               verified=True),
    ModelEntry("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", _HF_FOLDER, "vlm",
               verified=True),
    ModelEntry("medgemma-4b", "google/medgemma-4b-it", _HF_FOLDER, "vlm", gated=True,
               verified=True),
    ModelEntry("patho-r1-7b", "WenchuanZhang/Patho-R1-7B", _HF_FOLDER, "vlm", gated=True,
               verified=True, license="CC-BY-NC-ND-4.0"),
)


def names() -> list[str]:
    return [m.name for m in MODELS]


def get(name: str) -> ModelEntry:
    """The entry called ``name`` (case-insensitive), or a one-line error listing them."""
    for m in MODELS:
        if m.name == name.casefold():
            return m
    raise ConfigError(f"models pull: no model {name!r}; known: {', '.join(names())}")
