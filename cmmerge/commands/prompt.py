"""``cmmerge prompt``: the command's config read once into the typed job of
:mod:`cmmerge.stages.prompt` (every input resolved and checked), then run."""

from __future__ import annotations

import functools

from omegaconf import DictConfig, open_dict

from cmmerge.config.inputs import init_model, task_labels
from cmmerge.config.specs import PromptSpec
from cmmerge.config.values import config_int, run_context
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.prompting import (
    inference_device,
    inference_dtype,
)
from cmmerge.models.loading import model_kind
from cmmerge.stages.prompt import PromptJob, work
from cmmerge.stages.runner import run_stage


def run(cfg: DictConfig) -> dict:
    """Zero- or few-shot prompting of a decoder, scored by verbaliser log-likelihood."""
    spec = PromptSpec.from_config(cfg)  # shots, seed, normalize: typed and checked here
    batch_size = config_int(cfg, "prompt.batch_size")
    max_length = config_int(cfg, "prompt.max_length")
    if str(cfg.task.get("type") or "sequence") == "token":
        raise CmmergeError(f"task {cfg.task.name} labels words: prompting scores whole texts only")
    if batch_size < 1 or max_length < 2:
        raise CmmergeError("prompt.batch_size must be >= 1 and prompt.max_length >= 2")
    device = inference_device(cfg.prompt.get("device", "auto"))
    dtype = inference_dtype(cfg.prompt.get("precision", "auto"), device)
    init_cfg = cfg.copy()
    with open_dict(init_cfg):
        init_cfg.init = cfg.prompt.init
    model_dir, model_input = init_model(init_cfg)
    if model_kind(model_dir, str(cfg.model.kind)) != "decoder":
        raise CmmergeError(f"prompting needs a decoder (causal LM); {model_dir} is an encoder")
    labels = task_labels(cfg)  # task.labels, or inferred from the train file
    spec = spec.resolve(dtype=str(dtype).removeprefix("torch."))
    job = PromptJob(spec, model_dir, tuple(labels), str(device))
    return run_stage(run_context(cfg), spec, [model_input], functools.partial(work, job))
