"""The stages of cmmerge, one entry each: the command, its line in ``cmmerge --help``, the
run-directory folder it writes in, the spec of that folder (:mod:`cmmerge.config.specs`), and
what a study deletes once it is used. The command line, the pipeline, the planner and
``status`` read this table. A new stage is one entry here, its spec in
:mod:`cmmerge.config.specs`, its typed job and ``work(job, folder)`` in
``cmmerge.stages.<name>``, the command that reads its config into that job in
``cmmerge.commands.<name>`` (``run(cfg)``), and its config ``configs/<name>.yaml``.

Importing this module imports no command: a command's module is imported when it is first
asked for, so ``cmmerge --help`` loads no torch and a merge no training code. That is also why
a command is found by its name: the commands that read this table (``pipeline``, ``sweep``,
``status``) are entries of it, so importing them here would make each import itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage: ``cmmerge <name>`` runs ``cmmerge.commands.<name>.run(cfg)``."""

    name: str
    help: str  # its line in `cmmerge --help`
    folder: str | None = None  # the run directory's top folder its results are in
    spec: str | None = None  # the StageSpec class (cmmerge.config.specs) of its folder
    prunes: tuple[str, ...] = ()  # outputs a study deletes once every stage reading them is done
    kept_by: str | None = None  # the setting that keeps them (true: nothing is deleted)
    all_ranks: bool = False  # under a multi-process launch every rank works (training, scoring)
    resumable: bool = False  # an interrupted attempt's partial folder is resumed (checkpoints)

    def __post_init__(self) -> None:
        if bool(self.prunes) != bool(self.kept_by):
            raise ValueError(f"stage {self.name}: prunes and kept_by go together")

    @property
    def command(self) -> ModuleType:
        """The command's module (:mod:`cmmerge.commands`), imported now if it was not yet."""
        return import_module(f"cmmerge.commands.{self.name}")

    @property
    def run(self) -> Callable[[Any], Any]:
        """The command's ``run(cfg)``: reads the composed config into the stage's typed job
        and does the stage."""
        return self.command.run


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "data",
            "load corpus and task splits, write counts, labels and leakage removed",
            folder="data",
            spec="DataSpec",
        ),
        Stage(
            "cpt",
            "continued pre-training (MLM for encoders, causal LM for decoders)",
            folder="cpt",
            spec="CptSpec",
            all_ranks=True,
            resumable=True,
        ),
        Stage(
            "extract",
            "task vector tau = theta_cpt - theta_base over backbone parameters",
            folder="extract",
            spec="ExtractSpec",
        ),
        Stage(
            "merge",
            "merge task vectors into the base (task_arithmetic/tv, ties)",
            folder="merge",
            spec="MergeSpec",
            prunes=("model/",),
            kept_by="keep_merged",
        ),
        Stage(
            "finetune",
            "sequence classification from init=base|cpt|merged|DIR",
            folder="finetune",
            spec="FinetuneSpec",
            prunes=("model/", "adapter/", "sequential/"),
            kept_by="keep_models",
            all_ranks=True,
        ),
        Stage(
            "graft",
            "no code-mixed labels: tau_cpt added to a model fine-tuned on onto=TASK",
            folder="finetune",
            spec="GraftSpec",
            prunes=("model/",),
            kept_by="keep_models",
            all_ranks=True,
        ),
        Stage(
            "evaluate",
            "macro-F1, accuracy, per-class report, confusion matrix, predictions",
            folder="evaluate",
            spec="EvaluateSpec",
            all_ranks=True,
        ),
        Stage(
            "sweep",
            "Hydra multirun over lambda/method/density/seed: merge -> finetune -> evaluate",
        ),
        Stage("pipeline", "the paper's arms end to end (experiment=demo for the offline demo)"),
        Stage(
            "prompt",
            "zero/few-shot prompting baseline of a decoder (verbaliser log-likelihood)",
            folder="prompt",
            spec="PromptSpec",
        ),
        Stage(
            "report",
            "table of arms x metrics from a run directory (Markdown and CSV)",
            folder="report",
            spec="ReportSpec",
        ),
        Stage(
            "status", "state of every stage of a run (finished, stale, running, failed, missing)"
        ),
    )
}


def stage_folders() -> set[str]:
    """The top folders of a run directory that hold stages."""
    return {stage.folder for stage in STAGES.values() if stage.folder}


def stage_of(spec: object) -> Stage:
    """The stage whose folder ``spec`` (a :class:`~cmmerge.config.specs.StageSpec`) describes."""
    kind = type(spec).__name__
    for stage in STAGES.values():
        if stage.spec == kind:
            return stage
    raise KeyError(f"no stage has the spec {kind}")
