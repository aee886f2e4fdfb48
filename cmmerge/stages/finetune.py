"""`cmmerge finetune`: sequence classification from init=base|cpt|merged|DIR, best epoch by
validation macro-F1 -> finetune/<init>-<task>-s<seed>/model/ and metrics.json."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.models.loading import local_model_dir, resolve_model
from cmmerge.settings import data_root
from cmmerge.stages.ids import arm_name, cli_hint, finetune_id, merge_id, stage_dirs
from cmmerge.stages.inputs import split_seed, task_splits
from cmmerge.stages.runner import folder_input, run_stage, stage_input, view
from cmmerge.training.finetune import train_classifier


def init_model(cfg: DictConfig) -> tuple[Path, dict]:
    """The model folder fine-tuning starts from and its manifest input entry."""
    dirs = stage_dirs(cfg)
    init = str(cfg.init)
    if init == "base":
        path = resolve_model(cfg)
        return path, folder_input(path)
    if init == "cpt":
        return dirs["cpt"] / "model", stage_input(dirs["cpt"], cli_hint(cfg, "cpt"))
    if init == "merged":
        hint = cli_hint(cfg, "merge", f"method={cfg.method.name}", f"lambda={cfg['lambda']}",
                        f"density={cfg.density}")
        return dirs["merge"] / "model", stage_input(dirs["merge"], hint)
    path = local_model_dir(init)
    return path, folder_input(path)


def run(cfg: DictConfig) -> dict:
    dirs = stage_dirs(cfg)
    init_dir, init_input = init_model(cfg)
    labels = list(cfg.task.labels)
    seed = int(cfg.seed)
    config_view = view(cfg, "task", "finetune", init=str(cfg.init), init_dir=str(init_dir),
                       data_root=str(data_root(cfg)), split_seed=split_seed(cfg),
                       seed=seed)

    def work(stage_dir):
        splits = task_splits(cfg)
        result = train_classifier(init_dir, splits, labels, config_view["finetune"], stage_dir,
                                  seed)
        metrics = result.pop("metrics")
        write_json_atomic(stage_dir / "metrics.json", {"split": "validation", **metrics})
        write_model_card(stage_dir / "model", f"{finetune_id(cfg)}",
                         f"Fine-tuned by cmmerge for {cfg.task.name} ({', '.join(labels)}) from "
                         f"`{init_dir}`; the epoch kept is the best on validation macro-F1.",
                         {"arm": arm_name(cfg), "init": init_dir, "task": cfg.task.name,
                          "seed": seed, "validation macro-F1": f"{metrics['macro_f1']:.4f}",
                          "lr": cfg.finetune.lr, "epochs": cfg.finetune.epochs})
        return {"metrics": metrics, "outputs": ["model/", "metrics.json"], **result,
                "arm": arm_name(cfg), "init": str(cfg.init), "task": str(cfg.task.name),
                "merge_id": merge_id(cfg) if str(cfg.init) == "merged" else None}

    return run_stage(cfg, "finetune", dirs["finetune"], config_view, [init_input], work)
