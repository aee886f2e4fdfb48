"""`cmmerge pipeline`: a whole study in one run directory. The plan (:mod:`cmmerge.config.plan`)
expands ``pipeline.*`` into data -> cpt -> extract -> merges -> fine-tuning arms (-> grafts of
tau_cpt onto a fine-tune, ``pipeline.no_labels``) -> evaluate (-> prompting) steps over tasks,
CPT variants, lambda grids and seeds; it is printed first (to do, done, estimated time), then
run in order, then ``report``. Finished stages are skipped, so
the same command resumes an interrupted study.

A stage that fails is recorded and the stages that need it are left out; the others go on and
the command ends with one line naming the failures (exit 2). Merged checkpoints are deleted once
every fine-tune made from them here is finished (``keep_merged=true`` keeps them); with
``keep_models=false`` fine-tuned weights go once evaluated (metrics and predictions stay). A
pruned stage that a stage still to do needs is made again first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cmmerge import dist
from cmmerge.commands import evaluate
from cmmerge.config import plan
from cmmerge.config.plan import Step, with_values
from cmmerge.config.values import run_dir
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.stages.registry import STAGES
from cmmerge.stages.runner import as_user_error

log = logging.getLogger("cmmerge")


def run_step(step: Step, force: bool = False) -> dict:
    """Run one step of the plan (``force``: redo it even when finished)."""
    cfg = with_values(step.cfg, force=True) if force else step.cfg
    if step.stage == "evaluate":
        return evaluate.evaluate_one(cfg, str(step.eval_task))
    return STAGES[step.stage].run(cfg)


def keeps(cfg: DictConfig, stage: str) -> bool:
    """Whether this study keeps the outputs of ``stage`` after use (unprunable stages: yes)."""
    key = STAGES[stage].kept_by
    return key is None or bool(cfg.get(key, True))


def prune(cfg: DictConfig, stage: str, folder: Path) -> int:
    """Delete the weights of a finished ``stage`` in ``folder`` unless the study keeps them."""
    if keeps(cfg, stage) or not dist.is_main():
        return 0
    freed = transaction.prune(folder, STAGES[stage].prunes)
    if freed:
        log.info("pruned %s (%.1f MB; keep_* settings keep them)", folder, freed / 2**20)
    return freed


class _Executor:
    def __init__(self, cfg: DictConfig, steps: list[Step]) -> None:
        self.cfg, self.steps = cfg, steps
        self.producer = {s.folder: s for s in steps}
        self.consumers: dict[Path, list[Step]] = {}
        for s in steps:
            for need in s.needs:
                self.consumers.setdefault(need, []).append(s)
        self.status: dict[Path, str] = {}  # ok | failed | blocked
        self.checked: set[Path] = set()
        self.failures: list[tuple[Step, str]] = []

    def ensure(self, folder: Path) -> None:
        """Make a pruned upstream again when a stage that needs it is not done."""
        if folder in self.checked or folder not in self.producer:
            return
        self.checked.add(folder)
        gone = transaction.pruned(folder)
        waiting = [c for c in self.consumers.get(folder, []) if not plan.is_current(c)]
        if not gone or not waiting:
            return
        step = self.producer[folder]
        for need in step.needs:
            self.ensure(need)
        log.info(
            "%s was pruned after use and %s needs it: making it again",
            folder,
            waiting[0].folder,
        )
        run_step(step, force=True)

    def run(self, step: Step) -> None:
        blocked = [n for n in step.needs if self.status.get(n) in ("failed", "blocked")]
        if blocked:
            self.status[step.folder] = "blocked"
            log.warning("%s left out: %s failed", step.folder, blocked[0])
            return
        try:
            for need in step.needs:
                self.ensure(need)
            run_step(step)
        except Exception as err:  # noqa: BLE001 - one stage's failure must not end the study
            if self.cfg.get("debug"):
                raise
            err = as_user_error(err, step.folder) or err  # a full disk: one line, no traceback
            if not isinstance(err, CmmergeError):
                log.exception("pipeline: %s failed", step.folder)
            log.error("pipeline: %s failed: %s", step.folder, err)
            self.status[step.folder] = "failed"
            self.failures.append((step, " ".join(str(err).split()) or type(err).__name__))
            return
        self.status[step.folder] = "ok"
        for need in step.needs:
            users = self.consumers[need]
            if self.status.get(need) == "ok" and all(
                self.status.get(u.folder) == "ok" for u in users
            ):
                prune(self.cfg, self.producer[need].stage, need)


def run(cfg: DictConfig) -> dict | None:
    steps = plan.expand(cfg)
    root = run_dir(cfg)
    if dist.is_main():
        print(plan.describe(steps, root), flush=True)
    if cfg.pipeline.get("dry_run"):
        return None  # the plan only (no closing line)
    work = [s for s in steps if s.stage != "report"]
    executor = _Executor(cfg, work)
    for step in work:
        executor.run(step)
    trained = [s for s in work if s.stage in ("finetune", "graft", "prompt")]
    result: dict = {}
    if any(executor.status.get(s.folder) == "ok" for s in trained):
        result = STAGES["report"].run(cfg)
    if executor.failures:
        step, error = executor.failures[0]
        left_out = sum(1 for v in executor.status.values() if v == "blocked")
        raise CmmergeError(
            f"{len(executor.failures)} of {len(work)} stages failed ({step.name(root)}: {error})"
            f"{f', {left_out} left out' if left_out else ''}; the others are done: run the same "
            "command again to retry"
        )
    return result
