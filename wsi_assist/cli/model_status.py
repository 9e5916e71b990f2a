"""What `wsi-assist models` says of the sub-models and captioners of a config: one line
each, whether it loads and, when it does not, why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wsi_assist.errors import WsiAssistError
from wsi_assist.settings import Config


@dataclass(frozen=True)
class ModelStatus:
    """One configured model: its role, what it is, whether it loads, and a note."""

    role: str
    name: str
    ok: bool
    note: str

    def line(self) -> str:
        return f"{self.role:<15} {self.name}: {self.note}"


def submodel_statuses(cfg: Config, device: str, load: bool) -> list[ModelStatus]:
    """Every ``submodels.specs`` entry: the built-in nucleus analysis, or a spec whose
    ONNX model is loaded (``load``) with the providers a run would use."""
    from wsi_assist.models.submodel_spec import load_spec
    from wsi_assist.models.submodels import choose_providers, get_submodel, resolve_spec_path
    from wsi_assist.stages.submodels import is_builtin

    out = []
    for entry in cfg.submodels.specs:
        if is_builtin(entry):
            out.append(ModelStatus("sub-model", entry, True,
                                   "built-in QuPath-style nucleus analysis (no file needed)"))
            continue
        path = resolve_spec_path(entry)
        try:
            if not load:
                spec = load_spec(path.resolve())
                out.append(ModelStatus("sub-model", str(path), True,
                                       f"spec reads: {spec.name} ({spec.task}), "
                                       f"model {spec.model_path} (not loaded)"))
                continue
            providers = choose_providers(cfg.submodels.providers, device)
            sm = get_submodel(path, providers)
        except WsiAssistError as e:
            out.append(ModelStatus("sub-model", str(path), False, f"error: {e}"))
            continue
        s = sm.spec
        out.append(ModelStatus("sub-model", str(path), True,
                               f"loads: {s.name} ({s.task}), {len(s.output.classes)} "
                               f"classes, {', '.join(sm.session.get_providers())}"))
    return out


def captioner_statuses(cfg: Config, device: str, load: bool | None) -> list[ModelStatus]:
    """The captioner (``caption.model``) and the optional summary model: not configured,
    or whether each loads. ``load`` True: loaded fully (slow for 7B models); None (the
    default): a cheap check (config.json and architecture, the weight files named by the
    index, the tokenizer/processor) that reads no weights; False: whether the folder exists."""
    c = cfg.caption
    roles = [("captioner", "caption.model", c.model),
             ("summary model", "caption.summary_model", c.summary_model)]
    out = []
    for role, key, spec in roles:
        if spec is None:
            if role == "captioner":
                out.append(ModelStatus(role, key, True, "not configured: the caption stage "
                                       "will not run (set caption.model)"))
            continue
        if load is None:
            out.append(_quick(role, key, spec))
        else:
            out.append(_captioner(role, key, spec, device, load))
    return out


def _quick(role: str, key: str, spec: str) -> ModelStatus:
    """The cheap check of one captioner or summary model (no weights read)."""
    from wsi_assist.models.vlm_check import quick_check

    try:
        note = quick_check(spec, key, summary=role == "summary model")
    except WsiAssistError as e:
        return ModelStatus(role, spec, False, f"error: {e}")
    return ModelStatus(role, spec, True, note)


def _captioner(role: str, key: str, spec: str, device: str, load: bool) -> ModelStatus:
    local = Path(spec).expanduser()
    if not load:
        looks_local = local.exists() or spec.startswith((".", "/", "~"))
        if looks_local and not local.is_dir():
            return ModelStatus(role, spec, False, "error: folder not found")
        return ModelStatus(role, spec, True, "configured (not loaded)")
    try:
        if role == "summary model":
            from transformers import AutoModelForCausalLM

            from wsi_assist.models.captioner import load_pretrained

            model = load_pretrained(spec, AutoModelForCausalLM, key)
            kind = type(model).__name__
        else:
            from wsi_assist.models.captioner import Captioner

            kind = type(Captioner(spec, device).model).__name__
    except WsiAssistError as e:
        return ModelStatus(role, spec, False, f"error: {e}")
    return ModelStatus(role, spec, True, f"loads: {kind} on {device}")
