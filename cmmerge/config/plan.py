"""A study as a list of stage steps: the pipeline's tasks x CPT variants x arms x lambdas x seeds
expanded into data, cpt, extract, merge, finetune, evaluate and prompt steps in the order they
run, each with its folder (from :mod:`cmmerge.config.ids`) and the upstream folders it reads.

``pipeline.*`` keys read here (``configs/pipeline.yaml``): ``tasks``, ``seeds``,
``cpt_variants``, ``baselines``, ``merges`` and ``multi_source`` (``lambda`` and ``density`` may
be lists: a grid), ``sequential``, ``joint``, ``no_labels`` and ``prompts``.

``no_labels`` (no code-mixed labels): per entry ``{onto: TASK, lambda: [...], method,
density, baselines, finetune}``, the base fine-tuned on ``onto`` (per seed), a graft per lambda
(tau_cpt added to it, scored on the code-mixed task's validation split) evaluated on the task's
evaluation tasks, and the ``onto`` baselines (default Full FT and CPT->FT on ``onto``)
evaluated there too, beside the task's own arms (the ceiling, with code-mixed labels).
``finetune`` (e.g. ``{epochs: 3}``) overrides ``finetune.*`` for the fine-tunes on ``onto`` and
the grafts made from them (a labelled set in one language is often smaller), not the ceiling.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cmmerge.config.ids import stage_dirs
from cmmerge.config.keys import KEYS
from cmmerge.config.specs import PromptSpec
from cmmerge.config.timing import duration, estimate, measured
from cmmerge.config.values import run_dir
from cmmerge.errors import CmmergeError
from cmmerge.presets import CONFIG_DIR, load_group_config, plain
from cmmerge.stages.registry import STAGES

_ARM_KEYS = ("sequential", "joint", "multi_source", "no_labels")


def with_values(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with top-level keys (and ``method.name`` as ``method``) replaced."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in values.items():
            if key == "method":
                out.method.name = value
            else:
                out[key] = value
    return out


@dataclass
class Step:
    """One stage of a study: ``stage`` run with ``cfg`` into ``folder``, reading ``needs``."""

    stage: str
    cfg: DictConfig
    folder: Path
    needs: tuple[Path, ...] = ()
    eval_task: str | None = None  # evaluate: the task whose test split is scored
    identity: str = field(default="", repr=False)

    def name(self, root: Path) -> str:
        """The folder relative to the run directory (``finetune/base-sentiment-en-hi-s0``)."""
        try:
            return self.folder.relative_to(root).as_posix()
        except ValueError:
            return str(self.folder)


def _as_list(value: Any) -> list:
    if value is None:
        return [None]
    value = plain(value)
    return list(value) if isinstance(value, list | tuple) else [value]


def seeds(cfg: DictConfig) -> list[int]:
    """``pipeline.seeds``, or the configured ``seed``."""
    return [int(s) for s in (cfg.pipeline.get("seeds") or [cfg.seed])]


def task_entries(cfg: DictConfig) -> list[dict]:
    """``pipeline.tasks`` as mappings ``{name, corpus, eval_tasks, sequential, joint,
    multi_source, no_labels, prompt}``; a plain name, or a key left out, takes the pipeline's
    (or the run's); ``prompt`` is merged into the ``prompt`` settings of that task's prompting
    arms."""
    entries = plain(cfg.pipeline.get("tasks")) or [str(cfg.task.name)]
    out = []
    for entry in entries:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        if "name" not in entry:
            raise CmmergeError(f"pipeline.tasks entry {entry} has no name")
        entry.setdefault("corpus", str(cfg.corpus.name))
        entry.setdefault("eval_tasks", plain(cfg.get("eval_tasks")))
        for key in _ARM_KEYS:
            entry.setdefault(key, plain(cfg.pipeline.get(key)) or [])
        out.append(entry)
    return out


def _task_cfg(cfg: DictConfig, entry: dict) -> DictConfig:
    """The run's config for one task entry (its task, corpus and evaluation tasks)."""
    values: dict[str, Any] = {"eval_tasks": entry["eval_tasks"]}
    if entry["name"] != str(cfg.task.name):
        values["task"] = load_group_config("task", entry["name"])
    if entry["corpus"] != str(cfg.corpus.name):
        values["corpus"] = load_group_config("corpus", entry["corpus"])
    return with_values(cfg, **values)


def _variant_cfg(cfg: DictConfig, variant: dict | None) -> DictConfig:
    out = copy.deepcopy(cfg)
    if variant:
        with open_dict(out):
            out.cpt = OmegaConf.merge(out.cpt, variant)
    return out


def _merge_settings(spec: dict) -> Iterator[dict]:
    """Every point of a merge spec's grid (``lambda`` and ``density`` may be lists)."""
    for scale in _as_list(spec.get("lambda", 1.0)):
        for density in _as_list(spec.get("density")):
            values = {"init": "merged", "method": spec["method"], "lambda": scale}
            if density is not None:
                values["density"] = density
            for key in ("sources", "weights"):
                if spec.get(key) is not None:
                    values[key] = list(spec[key])
            yield values


def _prompt_defaults(cfg: DictConfig) -> DictConfig:
    """The ``prompt`` section of ``prompt.yaml`` under the run's own, and the default ``shots``."""
    base = OmegaConf.load(CONFIG_DIR / "prompt.yaml")
    section = OmegaConf.merge(base.prompt, cfg.get("prompt") or {})
    return with_values(cfg, prompt=section, shots=int(KEYS["shots"].default))


class _Plan:
    def __init__(self) -> None:
        self.steps: dict[Path, Step] = {}

    def add(self, step: Step) -> Path:
        step.identity = _identity(step)
        known = self.steps.get(step.folder)
        if known is None:
            self.steps[step.folder] = step
        elif known.identity != step.identity:
            raise CmmergeError(
                f"two different {step.stage} stages of this study would share {step.folder}: "
                "give the variants settings that name their folders apart"
            )
        return step.folder


def _identity(step: Step) -> str:
    """What makes a step's result; two steps in one folder must agree on it."""
    c = step.cfg
    keys: dict[str, Any] = {"stage": step.stage, "needs": [str(p) for p in step.needs]}
    if step.stage in ("cpt", "extract", "data"):
        keys.update(model=plain(c.model), corpus=plain(c.corpus), cpt=plain(c.cpt))
    if step.stage in ("merge",):
        keys.update(method=plain(c.method), scale=c["lambda"], density=c.get("density"))
        keys.update(sources=plain(c.get("sources")), weights=plain(c.get("weights")))
    if step.stage in ("finetune", "evaluate", "prompt", "data", "graft"):
        keys.update(task=str(c.task.name), seed=int(c.seed))
    if step.stage in ("finetune", "evaluate", "graft"):
        keys.update(init=str(c.init), finetune=plain(c.finetune), peft=plain(c.get("peft")))
    if step.stage == "graft":
        keys.update(method=plain(c.method), scale=c["lambda"], density=c.get("density"))
        keys.update(onto=str(c.onto), evaluate=plain(c.evaluate))
    if step.stage == "prompt":
        keys.update(shots=int(c.shots), prompt=plain(c.prompt))
    keys["eval_task"] = step.eval_task
    return json.dumps(keys, sort_keys=True, default=str)


def _arm_cfgs(tcfg: DictConfig, entry: dict, baselines: list[str]) -> list[DictConfig]:
    """The fine-tuning arms of one task that need no merge: baselines, sequential, joint."""
    arms = [with_values(tcfg, init=str(init)) for init in baselines]
    for key in ("sequential", "joint"):
        if entry[key]:
            arm = with_values(tcfg, init="base")
            with open_dict(arm):
                arm.finetune[key] = list(entry[key])
            arms.append(arm)
    return arms


def _finetune_and_evaluate(
    plan: _Plan, arm: DictConfig, needs: tuple[Path, ...], seed: int, stage: str = "finetune"
) -> Path:
    arm = with_values(arm, seed=seed)
    dirs = stage_dirs(arm)
    ft = plan.add(Step(stage, arm, dirs["finetune"], needs))
    for task in [str(t) for t in (arm.get("eval_tasks") or [arm.task.name])]:
        plan.add(Step("evaluate", arm, dirs["evaluate"] / task, (ft,), eval_task=task))
    return ft


def _no_labels(plan: _Plan, vcfg: DictConfig, spec: dict, seeds: list[int], cpt_dir, ext_dir):
    """One ``pipeline.no_labels`` entry for one task and CPT variant: the base fine-tuned on
    ``onto`` and the grafts of tau_cpt onto it, per seed and lambda, evaluated on the task's
    evaluation tasks, and the ``onto`` baselines (Full FT / CPT->FT on ``onto``) evaluated
    there too."""
    spec = {"onto": spec} if isinstance(spec, str) else dict(spec)
    if not spec.get("onto"):
        raise CmmergeError(f"pipeline.no_labels entry {spec} has no onto (the labelled task)")
    onto = str(spec["onto"])
    eval_tasks = [str(t) for t in (vcfg.get("eval_tasks") or [vcfg.task.name])]
    source = with_values(vcfg, task=load_group_config("task", onto), eval_tasks=eval_tasks)
    mine, theirs = plain(vcfg.task.get("labels")), plain(source.task.get("labels"))
    if mine and theirs and list(mine) != list(theirs):
        raise CmmergeError(
            f"pipeline.no_labels: onto={onto} has labels {list(theirs)}, {vcfg.task.name} has "
            f"{list(mine)}: give that task's entry in pipeline.tasks no_labels: []"
        )
    tuned = _finetune_overrides(vcfg, spec)
    source = _with_finetune(source, tuned)
    for init in spec.get("baselines", ["base", "cpt"]):
        needs = (cpt_dir,) if str(init) == "cpt" else ()
        for seed in seeds:
            _finetune_and_evaluate(plan, with_values(source, init=str(init)), needs, seed)
    method = str(spec.get("method", "task_arithmetic"))
    for values in _merge_settings({**spec, "method": method}):
        values = {k: v for k, v in values.items() if k not in ("sources", "weights")}
        arm = _with_finetune(with_values(vcfg, **{**values, "init": "graft", "onto": onto}), tuned)
        for seed in seeds:
            src = with_values(source, init="base", seed=seed)
            ft = plan.add(Step("finetune", src, stage_dirs(src)["finetune"]))
            _finetune_and_evaluate(plan, arm, (ext_dir, ft), seed, stage="graft")


def _finetune_overrides(vcfg: DictConfig, spec: dict) -> dict:
    """A ``pipeline.no_labels`` entry's ``finetune`` overrides, checked against ``finetune.*``."""
    tuned = plain(spec.get("finetune")) or {}
    if not isinstance(tuned, dict):
        raise CmmergeError(f"pipeline.no_labels entry {spec}: finetune must be a mapping")
    unknown = sorted(set(tuned) - set(vcfg.finetune))
    if unknown:
        raise CmmergeError(
            f"pipeline.no_labels entry for onto={spec['onto']}: finetune.{unknown[0]} is not a "
            f"finetune setting (known: {', '.join(sorted(vcfg.finetune))})"
        )
    return tuned


def _with_finetune(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with ``finetune.*`` keys replaced (``cfg`` itself when none)."""
    return with_values(cfg, finetune={**plain(cfg.finetune), **values}) if values else cfg


def _merged_arm(
    plan: _Plan, vcfg: DictConfig, values: dict, ext_dir: Path, run_seeds: list[int]
) -> None:
    """A merge arm's merge, fine-tunes and evaluations. A merge of the CPT's task vector alone
    is shared by every seed; a merge with a task's tau (the base fine-tuned on that task, with
    the seed of the fine-tune made from the merge) is one merge per seed, from that seed's
    source fine-tune."""
    sources = [str(s) for s in values.get("sources") or ["cpt"]]
    tasks = [s for s in sources if s != "cpt"]
    for group in [[seed] for seed in run_seeds] if tasks else [run_seeds]:
        arm = with_values(vcfg, seed=group[0], **values)
        needs = [ext_dir] if "cpt" in sources else []
        for source in tasks:  # tau of that task: the base fine-tuned on it first
            src = with_values(
                vcfg, init="base", seed=group[0], task=load_group_config("task", source)
            )
            needs.append(plan.add(Step("finetune", src, stage_dirs(src)["finetune"])))
        merge_dir = plan.add(Step("merge", arm, stage_dirs(arm)["merge"], (*needs,)))
        for seed in group:
            _finetune_and_evaluate(plan, arm, (merge_dir,), seed)


def expand(cfg: DictConfig) -> list[Step]:
    """Every step of the study ``cfg.pipeline`` describes, in the order the pipeline runs them;
    steps that several arms share (a CPT, Full FT across CPT variants) appear once."""
    plan = _Plan()
    plan.add(Step("data", cfg, stage_dirs(cfg)["data"]))
    run_seeds = seeds(cfg)
    baselines = [str(b) for b in cfg.pipeline.get("baselines") or []]
    merges = list(plain(cfg.pipeline.get("merges")) or [])
    prompts = plain(cfg.pipeline.get("prompts")) or {}
    for entry in task_entries(cfg):
        tcfg = _task_cfg(cfg, entry)
        for variant in plain(cfg.pipeline.get("cpt_variants")) or [None]:
            vcfg = _variant_cfg(tcfg, variant)
            dirs = stage_dirs(vcfg)
            cpt_dir = plan.add(Step("cpt", vcfg, dirs["cpt"]))
            ext_dir = plan.add(Step("extract", vcfg, dirs["extract"], (cpt_dir,)))
            for arm in _arm_cfgs(vcfg, entry, baselines):
                needs = (cpt_dir,) if str(arm.init) == "cpt" else ()
                for seed in run_seeds:
                    _finetune_and_evaluate(plan, arm, needs, seed)
            for spec in [*merges, *entry["multi_source"]]:
                for values in _merge_settings(spec):
                    _merged_arm(plan, vcfg, values, ext_dir, run_seeds)
            for spec in entry["no_labels"]:
                _no_labels(plan, vcfg, spec, run_seeds, cpt_dir, ext_dir)
        for shots in _as_list(prompts.get("shots")) if prompts else []:
            pcfg = _prompt_defaults(tcfg)
            with open_dict(pcfg):
                pcfg.prompt = OmegaConf.merge(pcfg.prompt, entry.get("prompt") or {})
                pcfg.shots = int(shots)
                pcfg.prompt.init = str(prompts.get("init") or pcfg.prompt.init)
            for seed in run_seeds[:1] if int(shots) == 0 else run_seeds:
                plan.add(_prompt_step(with_values(pcfg, seed=seed)))
    plan.add(Step("report", cfg, stage_dirs(cfg)["report"]))
    return list(plan.steps.values())


def _prompt_step(cfg: DictConfig) -> Step:
    dirs = stage_dirs(cfg)
    needs = (dirs["cpt"],) if str(cfg.prompt.init) == "cpt" else ()
    return Step(
        "prompt", cfg, run_dir(cfg) / "prompt" / PromptSpec.from_config(cfg).folder_id, needs
    )


def is_done(folder: Path) -> bool:
    """A whole, finished stage in ``folder`` made from the upstream versions there now (by its
    folder: a setting changed under the same id is found out when the stage runs)."""
    from cmmerge.io import transaction

    manifest = transaction.finished_manifest(folder)
    return manifest is not None and not transaction.stale_inputs(manifest)


def settings_changed(step: Step) -> bool:
    """Whether the finished stage in ``step``'s folder recorded other settings than ``step``
    has (one changed under the same folder name: running the step redoes it). Entries the
    stage fills in when it runs, and data files, are checked by the runner alone."""
    from cmmerge.config.specs import spec_for
    from cmmerge.io import transaction
    from cmmerge.io.manifest import fingerprint

    manifest = transaction.finished_manifest(step.folder)
    recorded = manifest.get("config") if manifest else None
    if STAGES[step.stage].spec is None or not isinstance(recorded, dict):
        return False
    stage = "finetune" if step.stage == "graft" else step.stage
    options = {"task_name": step.eval_task} if step.stage == "evaluate" else {}
    view = spec_for(step.cfg, stage, **options).settings_view()
    if any(key not in recorded for key in view):
        return True
    return fingerprint(view, []) != fingerprint({k: recorded[k] for k in view}, [])


def is_current(step: Step) -> bool:
    """:func:`is_done` for ``step``'s folder, with the settings ``step`` has."""
    return is_done(step.folder) and not settings_changed(step)


def pending(steps: list[Step]) -> list[Step]:
    """The steps still to do: those not done (or done with other settings), those pruned after
    use that a step to do needs
    (made again first), and everything made from a step that is redone (then stale), except
    from a pruned merge made again (deterministic: the same version as before)."""
    from cmmerge.io import transaction

    todo = {s.folder for s in steps if not is_current(s)}
    pruned = {s.folder for s in steps if transaction.pruned(s.folder)}
    remade: set[Path] = set()  # pruned merges made again: the same version (see runner)
    size = -1
    while size != len(todo):
        size = len(todo)
        for step in reversed(steps):  # upstreams of steps to do, when pruned
            if step.folder in pruned and any(
                step.folder in s.needs for s in steps if s.folder in todo
            ):
                if step.stage in transaction.DETERMINISTIC and step.folder not in todo:
                    remade.add(step.folder)
                todo.add(step.folder)
        for step in steps:  # downstream of steps to do
            if any(n in todo and n not in remade for n in step.needs):
                todo.add(step.folder)
    if todo:
        todo |= {s.folder for s in steps if s.stage == "report"}
    return [s for s in steps if s.folder in todo]


def describe(steps: list[Step], root: Path, shown: int = 5) -> str:
    """The plan as text: per stage kind the steps to do and done, an estimate of the time the
    ones to do take, and the first of them."""
    todo = pending(steps)
    lines = [
        f"plan for {root}: {len(steps)} stages, {len(steps) - len(todo)} done, {len(todo)} to do"
    ]
    lines.append(f"  {'stage':<9} {'to do':>6} {'done':>6}  estimate")
    order = ("data", "cpt", "extract", "merge", "finetune", "graft", "evaluate", "prompt", "report")
    found = measured(root)  # the run's manifests, read once for every estimate below
    for stage in sorted({s.stage for s in steps}, key=order.index):
        mine = [s for s in steps if s.stage == stage]
        left = [s for s in todo if s.stage == stage]
        seconds, known, unknown = estimate(left, root, found)
        when = "-" if not left else (duration(seconds) if known else "not measured yet")
        if left and known and unknown:
            when += f" (+{unknown} not measured)"
        lines.append(f"  {stage:<9} {len(left):>6} {len(mine) - len(left):>6}  {when}")
    seconds, known, unknown = estimate(todo, root, found)
    if todo:
        basis = "measured wall times of this run's finished stages"
        total = f"about {duration(seconds)}" if known else "no estimate yet (nothing measured)"
        if known and unknown:
            total += f" + {unknown} stage(s) of a kind not measured yet"
        lines.append(f"  time to do: {total}" + (f" (from {basis})" if known else ""))
        names = [s.name(root) for s in todo[:shown]]
        more = f", ... (+{len(todo) - shown} more)" if len(todo) > shown else ""
        lines.append("  next: " + ", ".join(names) + more)
    return "\n".join(lines)
