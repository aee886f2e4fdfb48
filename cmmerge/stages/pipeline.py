"""`cmmerge pipeline`: data -> cpt -> extract -> merges -> the fine-tuning arms (Full FT, CPT->FT,
sequential and joint FT when configured, one per merge) -> evaluate -> report. Finished stages
are skipped on a re-run."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, open_dict

from cmmerge.settings import load_group_config
from cmmerge.stages import cpt, data, evaluate, extract, finetune, merge, report


def with_values(cfg: DictConfig, **values) -> DictConfig:
    """A copy of ``cfg`` with top-level keys (and ``method.name`` as ``method``) replaced."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in values.items():
            if key == "method":
                out.method.name = value
            else:
                out[key] = value
    return out


def run(cfg: DictConfig) -> dict:
    data.run(cfg)
    cpt.run(cfg)
    extract.run(cfg)
    arms = [with_values(cfg, init=init) for init in cfg.pipeline.baselines]
    for key in ("sequential", "joint"):
        tasks = list(cfg.pipeline.get(key) or [])
        if tasks:
            arm = with_values(cfg, init="base")
            with open_dict(arm):
                arm.finetune[key] = tasks
            arms.append(arm)
    specs = list(cfg.pipeline.merges) + list(cfg.pipeline.get("multi_source") or [])
    for spec in specs:
        for name in spec.get("sources") or []:
            if name != "cpt":  # tau of that task: fine-tune the base on it first
                source_task = load_group_config("task", str(name))
                finetune.run(with_values(cfg, init="base", task=source_task))
        values = {"init": "merged", "method": spec["method"], "lambda": spec["lambda"]}
        for key in ("density", "sources", "weights"):
            if spec.get(key) is not None:
                values[key] = spec[key]
        arm = with_values(cfg, **values)
        merge.run(arm)
        arms.append(arm)
    for arm in arms:
        finetune.run(arm)
        evaluate.run(arm)
    return report.run(cfg)
