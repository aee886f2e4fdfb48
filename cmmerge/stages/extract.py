"""`cmmerge extract`: task vector tau = theta_cpt - theta_base over backbone parameters."""

from __future__ import annotations

from omegaconf import DictConfig

from cmmerge.io.manifest import write_json_atomic
from cmmerge.merging.engine import TASK_VECTOR_FILE, extract_task_vector
from cmmerge.models.loading import resolve_model
from cmmerge.stages.ids import cli_hint, stage_dirs
from cmmerge.stages.runner import folder_input, run_stage, stage_input, view


def run(cfg: DictConfig) -> dict:
    dirs = stage_dirs(cfg)
    base = resolve_model(cfg)
    inputs = [folder_input(base), stage_input(dirs["cpt"], cli_hint(cfg, "cpt"))]
    config_view = view(cfg, "model", dtype=cfg.get("dtype"))

    def work(stage_dir):
        import torch

        dtype = getattr(torch, str(cfg.dtype)) if cfg.get("dtype") else torch.float32
        stats = extract_task_vector(base, dirs["cpt"] / "model", stage_dir / TASK_VECTOR_FILE,
                                    dtype=dtype)
        write_json_atomic(stage_dir / "stats.json", stats)
        metrics = {k: stats[k] for k in ("n_tensors", "n_params", "l2_norm") if k in stats}
        return {"metrics": metrics, "outputs": [TASK_VECTOR_FILE, "stats.json"]}

    return run_stage(cfg, "extract", dirs["extract"], config_view, inputs, work)
