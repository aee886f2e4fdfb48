"""`cmmerge pipeline`: data -> cpt -> extract -> merges -> the fine-tuning arms (Full FT, CPT->FT,
one per merge) -> evaluate -> report. Finished stages are skipped on a re-run."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, open_dict

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
    for spec in cfg.pipeline.merges:
        values = {"init": "merged", "method": spec["method"], "lambda": spec["lambda"]}
        if spec.get("density") is not None:
            values["density"] = spec["density"]
        arm = with_values(cfg, **values)
        merge.run(arm)
        arms.append(arm)
    for arm in arms:
        finetune.run(arm)
        evaluate.run(arm)
    return report.run(cfg)
