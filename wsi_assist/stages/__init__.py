"""The stage registry: every stage's function, the stages it needs, the config sections
and per-slide inputs it reads, how to tell it ran, and how to enable it.

Planning (which stages rerun), fingerprints, ``--stages`` validation and the report's
"not run" table are all derived from :data:`REGISTRY`. A stage function is called as
``run(slide, **sections)``: a :class:`SlideContext` and exactly the config sections the
stage declares, and returns a short summary dict for logs and ``done.json``.

Stages that need RGB brightfield tiles (``rgb_only``: the PathCLIP embeddings and what
reads them, the RGB sub-models) are "not run" on multichannel (fluorescence) slides,
with the reason, whether or not they were asked for. Sections in
:data:`MULTICHANNEL_SECTIONS` enter a fingerprint only for multichannel slides, the
only ones they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_assist.errors import StageSkipped
from wsi_assist.files import work_dir
from wsi_assist.report.build import build_slide_outputs
from wsi_assist.settings import Config, Section
from wsi_assist.slide import SlideInfo
from wsi_assist.stages import (
    caption,
    embed,
    report,
    submodels,
    tilepass,
    tiles,
    tissue,
    zeroshot,
)
from wsi_assist.stages.context import SlideContext, check_device, resolve_device
from wsi_assist.store import SlideStore

__all__ = ["REGISTRY", "STAGE_NAMES", "SlideContext", "Stage", "check_models",
           "check_stage_names", "fingerprints", "not_rgb_reason", "rebuild_report",
           "resolve_device", "run_device", "run_stages", "stage_table", "stages_to_run"]

log = logging.getLogger(__name__)

StageFunc = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and everything the batch needs to know about it."""

    name: str
    run: StageFunc
    #: Stages whose stored results this one reads.
    needs: tuple[str, ...]
    #: Config sections passed to ``run`` (and hashed into its fingerprint).
    sections: tuple[str, ...]
    #: Per-slide values (see :data:`SLIDE_INPUTS`) its results depend on.
    slide_inputs: tuple[str, ...]
    #: Whether the slide's store holds this stage's results.
    done: Callable[[SlideStore], bool]
    #: How a user enables the stage when it did not run.
    how_to_enable: str
    #: Whether the stage can run with these sections (a model configured, ...); when
    #: not, it is recorded as "not run" with ``how_to_enable``, not as a failure.
    configured: Callable[..., bool] = lambda store, **sections: True
    #: Whether, with these sections, the stage runs a model on the run's device (when
    #: no stage to run does, ``auto`` is not resolved and torch is not imported).
    on_device: Callable[..., bool] = lambda **sections: False
    #: Whether the stage needs RGB brightfield tiles (not run on multichannel slides).
    rgb_only: bool = False
    #: Called with the stage's sections once before any slide: raises a WsiAssistError
    #: naming the file when a configured model is missing or broken.
    check: Callable[..., None] = lambda **sections: None
    #: For stages that read tiles: called like ``run``, it prepares the stage and
    #: returns a :class:`tilepass.Planned` (its consumers of the slide's one tile pass,
    #: and how to store their results); ``run`` is that with a pass of its own.
    open_pass: Callable[..., tilepass.Planned] | None = None


#: Per-slide values a stage may depend on, beyond the file itself and its config.
SLIDE_INPUTS: dict[str, Callable[[SlideInfo], Any]] = {
    "mpp": lambda info: [info.mpp, info.mpp_source],
}
#: Sections read only for multichannel slides (RGB slides' fingerprints leave them out).
MULTICHANNEL_SECTIONS = frozenset({"channels"})

REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("tissue", tissue.run, needs=(), sections=("tissue", "stain", "channels"),
          slide_inputs=("mpp",), done=SlideStore.has_tissue,
          how_to_enable="add 'tissue' to stages"),
    Stage("tiles", tiles.run, needs=("tissue",), sections=("tiling", "outputs", "channels"),
          slide_inputs=(), done=SlideStore.has_grid,
          how_to_enable="add 'tiles' to stages (after 'tissue')", open_pass=tiles.open_pass),
    Stage("embed", embed.run, needs=("tiles",), sections=("embed",), slide_inputs=(),
          done=SlideStore.has_embeddings, how_to_enable=embed.HOW_TO_ENABLE,
          configured=embed.configured, on_device=embed.on_device, rgb_only=True,
          check=embed.check, open_pass=embed.open_pass),
    Stage("zeroshot", zeroshot.run, needs=("embed",), sections=("zeroshot", "embed"),
          slide_inputs=(), done=SlideStore.has_zeroshot,
          how_to_enable=f"{embed.HOW_TO_ENABLE}; zero-shot classes come from the tile "
                        "embeddings and a prompt set (zeroshot.prompts)",
          configured=zeroshot.configured, on_device=zeroshot.on_device, rgb_only=True),
    # ONNX sub-models take RGB (or BGR) tiles: on multichannel slides only the built-in
    # nuclei run (on the nuclear channel), the others are recorded as not run
    Stage("submodels", submodels.run, needs=("tiles", "zeroshot"),
          sections=("submodels", "nuclei", "channels"), slide_inputs=(),
          done=lambda store: bool(store.read_submodels()),
          how_to_enable="list the built-in 'nuclei' or sub-model spec files (ONNX + YAML) "
                        "under submodels.specs",
          configured=submodels.configured, on_device=submodels.on_device,
          check=submodels.check, open_pass=submodels.open_pass),
    Stage("caption", caption.run, needs=("embed", "zeroshot", "submodels"),
          sections=("caption",), slide_inputs=(), done=SlideStore.has_captions,
          how_to_enable=caption.HOW_TO_ENABLE, configured=caption.configured,
          on_device=caption.on_device, rgb_only=True),
    Stage("report", report.run, needs=("tiles", "embed", "zeroshot", "submodels", "caption"),
          sections=("report",), slide_inputs=(), done=report.done,
          how_to_enable="add 'report' to stages"),
)}
#: Stage names in pipeline order.
STAGE_NAMES = tuple(REGISTRY)


def check_stage_names(names: Iterable[str]) -> None:
    """ValueError naming the first unknown stage and the valid ones."""
    bad = [n for n in names if n not in REGISTRY]
    if bad:
        raise ValueError(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGE_NAMES)}")


def _sections(stage: Stage, config: Config) -> dict[str, Section]:
    return {name: config.section(name) for name in stage.sections}


def not_rgb_reason(stage: str, n_channels: int) -> str:
    """Why an RGB-only stage does not run on a multichannel slide."""
    return (f"fluorescence / multichannel image ({n_channels} channels); {stage} needs "
            "RGB brightfield tiles")


def check_models(config: Config, local: bool = True) -> None:
    """Before any slide starts: every model the run's stages are configured with is there
    (and sub-models load), and a CUDA device asked for exists (``local``: the slides run
    on this machine, not on a scheduler's workers). A WsiAssistError says what is wrong."""
    for name in config.stages:
        stage = REGISTRY[name]
        stage.check(**_sections(stage, config))
    if local:
        check_device(config.parallelism.device)


def run_device(config: Config) -> str:
    """The device of the run's models: ``parallelism.device``, ``auto`` resolved
    (:func:`resolve_device`) when a stage to run puts a model on it; an ``auto`` run
    whose stages run no model is ``cpu`` (torch not imported, no fallback said)."""
    spec = config.parallelism.device
    if spec != "auto" or any(REGISTRY[n].on_device(**_sections(REGISTRY[n], config))
                             for n in config.stages):
        return resolve_device(spec)
    return "cpu"


def fingerprints(slide_fp: str, config: Config, info: SlideInfo) -> dict[str, str]:
    """One fingerprint per stage: the slide file, the stage's config sections, its
    per-slide inputs and the fingerprints of the stages it needs."""
    fps: dict[str, str] = {}
    for stage in REGISTRY.values():
        blob = json.dumps({
            "slide": slide_fp, "deps": [fps[d] for d in stage.needs],
            "config": {n: s.model_dump(mode="json")
                       for n, s in _sections(stage, config).items()
                       if info.multichannel or n not in MULTICHANNEL_SECTIONS},
            "inputs": {k: SLIDE_INPUTS[k](info) for k in stage.slide_inputs}},
            sort_keys=True, default=str)
        fps[stage.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return fps


def stages_to_run(done: dict[str, Any] | None, want: dict[str, str],
                  stages: tuple[str, ...], force: bool) -> tuple[str, ...]:
    """The requested stages whose stored fingerprint differs from the wanted one."""
    if force or not done:
        return stages
    have = done.get("stages", {})
    return tuple(s for s in stages if have.get(s) != want[s])


def run_stages(slide: SlideContext, config: Config, names: tuple[str, ...]
               ) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``names`` in pipeline order; returns (summary, seconds) per stage. An
    exception leaving a stage carries the stage's name as ``.stage``.

    The stages among ``names`` that read tiles share one tile pass: at the first of
    them, each is opened (in order), one pass feeds all their consumers, and each
    stores its results at its own place in the order (the stages between them, such
    as ``zeroshot``, run after the pass). A stage's seconds are its own work: opening,
    its consumers' busy time, storing; the first also counts what the pass took beyond its
    busiest consumer (waiting for decoded tiles)."""
    summary: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    todo = [n for n in STAGE_NAMES if n in names]
    plans: dict[str, tilepass.Planned] | None = None
    for name in todo:
        stage = REGISTRY[name]
        if stage.open_pass is None:
            _step(slide, config, name, _call(slide, stage.run), summary, seconds)
        else:
            if plans is None:
                plans = _open_and_pass(slide, config, todo, summary, seconds)
            plan = plans.get(name)
            if plan is not None:
                _step(slide, config, name, _finish(plan), summary, seconds)
    return summary, seconds


def _open_and_pass(slide: SlideContext, config: Config, todo: list[str],
                   summary: dict[str, Any], seconds: dict[str, float]
                   ) -> dict[str, tilepass.Planned]:
    """Open every tile stage in ``todo`` and run the slide's one pass for them all."""
    plans: dict[str, tilepass.Planned] = {}
    for name in todo:
        stage = REGISTRY[name]
        if stage.open_pass is not None:
            plan = _step(slide, config, name, _call(slide, stage.open_pass), summary,
                         seconds)
            if plan is not None:
                plans[name] = plan
    consumers = [c for p in plans.values() for c in p.consumers]
    try:
        report = tilepass.run_pass(slide, consumers)  # a consumer's error names its stage
    except Exception as e:
        if not hasattr(e, "stage"):  # the stream's own: the first reader's
            e.stage = consumers[0].stage  # type: ignore[attr-defined]
        raise
    for c in consumers:
        seconds[c.stage] = seconds.get(c.stage, 0.0) + c.busy_s
    if consumers:  # what the pass took beyond its busiest consumer: waiting for tiles
        first = consumers[0].stage
        seconds[first] += max(0.0, report.seconds - max(c.busy_s for c in consumers))
    return plans


def _call(slide: SlideContext, func: Callable[..., Any]
          ) -> Callable[[dict[str, Section]], Any]:
    return lambda sections: func(slide, **sections)


def _finish(plan: tilepass.Planned) -> Callable[[dict[str, Section]], Any]:
    return lambda sections: plan.finish()


def _step(slide: SlideContext, config: Config, name: str,
          call: Callable[[dict[str, Section]], Any], summary: dict[str, Any],
          seconds: dict[str, float]) -> Any:
    """One step of stage ``name`` (its run, opening or finishing): checks whether it
    runs on this slide at all, records a skip, times it; None when skipped."""
    stage = REGISTRY[name]
    sections = _sections(stage, config)
    t0 = time.perf_counter()
    try:
        if stage.rgb_only and slide.info.multichannel:
            raise StageSkipped(not_rgb_reason(name, len(slide.info.channels)))
        if not stage.configured(slide.store, **sections):
            raise StageSkipped(stage.how_to_enable)
        out = call(sections)
    except StageSkipped as e:
        summary[name] = {"skipped": str(e)}
        slide.store.mark_skipped(name, str(e))
        # the batch says it once for all slides (batch.log_not_run)
        log.debug("%s: %s not run: %s", slide.slide_id, name, e)
        return None
    except Exception as e:
        e.stage = name  # type: ignore[attr-defined]
        raise
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    if isinstance(out, dict):
        summary[name] = out
        log.debug("%s: %s done in %.2f s: %s", slide.slide_id, name, seconds[name], out)
    return out


def rebuild_report(folder: Path, config: Config, info: dict[str, Any] | None = None,
                   seconds: dict[str, float] | None = None, device: str | None = None
                   ) -> dict[str, Any]:
    """Rebuild a finished slide's annotations and reports from its stored results alone
    (``wsi-assist report``): no model, no slide file."""
    store = SlideStore(folder, mode="r")
    return build_slide_outputs(store, config.report, stages=stage_table(store),
                               config_hash=config.section_hash(), slide_id=folder.name,
                               info=info, seconds=seconds, device=device,
                               scratch=work_dir(folder.resolve().parent))


def stage_table(store: SlideStore) -> dict[str, dict[str, str]]:
    """Per stage (the report itself excluded): ``done``, or ``not run`` with the reason
    and how to enable it."""
    out: dict[str, dict[str, str]] = {}
    record = store.read_slide()
    for stage in REGISTRY.values():
        if stage.name == "report":
            continue
        if stage.done(store):
            out[stage.name] = {"status": "done"}
            continue
        reason = store.skipped(stage.name)
        if stage.rgb_only and record.layout == "channels":
            reason = not_rgb_reason(stage.name, len(record.channels))
        out[stage.name] = {"status": "not run",
                           "reason": reason or "not in the run's stages",
                           "how_to_enable": reason or stage.how_to_enable}
    return out
