"""`cmmerge prompt`: zero/few-shot prompting of a decoder ->
prompt/<model>-<init>-<task>-k<shots>-s<seed>[-norm]/ (``-norm``: length-normalised scores)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from cmmerge.errors import CmmergeError
from cmmerge.evaluation.metrics import classification_metrics
from cmmerge.evaluation.prompting import (
    draw_shots,
    few_shot_prefix,
    inference_device,
    inference_dtype,
    score_prompts,
    verbalizer_list,
)
from cmmerge.io.manifest import write_json_atomic, write_jsonl_atomic
from cmmerge.models.loading import load_lm, load_tokenizer, model_kind
from cmmerge.settings import config_bool, config_int, plain
from cmmerge.stages.finetune import init_model
from cmmerge.stages.inputs import task_labels, task_splits
from cmmerge.stages.runner import run_stage
from cmmerge.stages.spec import PromptSpec

log = logging.getLogger("cmmerge")


def prompt_id(cfg: DictConfig) -> str:
    """``<model>-<init>-<task>-k<shots>-s<seed>[-norm][-<hash>]``: the folder of this prompting
    run (:attr:`PromptSpec.folder_id`)."""
    return PromptSpec.from_config(cfg).folder_id


def run(cfg: DictConfig) -> dict:
    shots, seed = config_int(cfg, "shots"), config_int(cfg, "seed")
    normalize = config_bool(cfg, "prompt.normalize")
    batch_size = config_int(cfg, "prompt.batch_size")
    max_length = config_int(cfg, "prompt.max_length")
    if shots < 0:
        raise CmmergeError(f"shots={shots}: give 0 (zero-shot) or a positive number")
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
    spec = PromptSpec.from_config(cfg).resolve(dtype=str(dtype).removeprefix("torch."))
    config_view = spec.config_view()

    def work(out_dir):
        splits = task_splits(cfg)
        verbalizers = verbalizer_list(labels, plain(cfg.prompt.verbalizers))
        template = str(cfg.prompt.template)
        demos = draw_shots(splits["train"]["text"], splits["train"]["label"], shots, seed)
        prefix = few_shot_prefix(demos, template, verbalizers)
        test = splits["test"]
        prompts = [prefix + template.format(text=t) for t in test["text"]]
        tokenizer = load_tokenizer(model_dir)
        model = load_lm(model_dir, "decoder").to(device=device, dtype=dtype)
        log.info("prompt: scoring %d prompts x %d labels on %s", len(prompts), len(labels), device)
        scores, truncated = score_prompts(
            model, tokenizer, prompts, verbalizers, batch_size, max_length, normalize
        )
        pred = scores.argmax(-1).tolist()
        metrics = classification_metrics(list(test["label"]), pred, labels)
        write_json_atomic(out_dir / "metrics.json", {"split": "test", **metrics})
        rows = (
            {
                "text": text,
                "gold": labels[gold],
                "pred": labels[p],
                "scores": dict(zip(labels, map(float, s), strict=True)),
            }
            for text, gold, p, s in zip(test["text"], test["label"], pred, scores, strict=True)
        )
        write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
        log.info("prompt %s k=%d: macro-F1 %.4f", cfg.task.name, shots, metrics["macro_f1"])
        scoring = "mean log-prob per verbaliser token" if normalize else "summed log-prob"
        return {
            "metrics": metrics,
            "outputs": ["metrics.json", "predictions.jsonl"],
            "shots_used": [{"text": t, "label": labels[y]} for t, y in demos],
            "verbalizers": dict(zip(labels, verbalizers, strict=True)),
            "scoring": scoring,
            "prompts_truncated": truncated,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "arm": f"Prompting ({shots}-shot{', normalised' if normalize else ''})",
            "task": str(cfg.task.name),
        }

    return run_stage(cfg, "prompt", spec.folder, config_view, [model_input], work)
