"""`cmmerge prompt`: zero/few-shot prompting of a decoder ->
prompt/<model>-<init>-<task>-k<shots>-s<seed>[-norm]/ (``-norm``: length-normalised scores)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict

from cmmerge.data.tasks import load_task
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.baseline import majority_macro_f1
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
from cmmerge.settings import config_bool, config_int
from cmmerge.stages.finetune import init_model
from cmmerge.stages.inputs import task_labels
from cmmerge.stages.runner import RunContext, run_stage
from cmmerge.stages.spec import PromptSpec, thaw

log = logging.getLogger("cmmerge")


def prompt_id(cfg: DictConfig) -> str:
    """``<model>-<init>-<task>-k<shots>-s<seed>[-norm][-<hash>]``: the folder of this prompting
    run (:attr:`PromptSpec.folder_id`)."""
    return PromptSpec.from_config(cfg).folder_id


def majority_baseline(gold: list[int], pred: list[int], labels: list[str], macro_f1: float) -> dict:
    """The majority-class baseline of the test set beside a prompting score: its macro-F1,
    whether the prompt beats it, and how many texts went to each label (a prompt that puts
    almost everything in one class shows here)."""
    counts = [gold.count(i) for i in range(len(labels))]
    top = max(range(len(labels)), key=counts.__getitem__)
    baseline = majority_macro_f1(counts)
    return {
        "majority_label": labels[top],
        "majority_macro_f1": baseline,
        "beats_majority": bool(macro_f1 > baseline + 1e-9),
        "predicted_counts": {label: pred.count(i) for i, label in enumerate(labels)},
    }


@dataclass(frozen=True)
class PromptJob:
    """A prompting run with everything resolved from the command: all that :func:`work` reads.

    Attributes:
        spec: The run's spec (task, template, verbalisers, shots, seed, batch size, length,
            scoring; the dtype the device runs resolved).
        model_dir: The decoder prompted.
        labels: The task's labels (``task.labels``, or those of its train file).
        device: Where the model runs (``cpu``, ``cuda:0``...).
    """

    spec: PromptSpec
    model_dir: Path
    labels: tuple[str, ...]
    device: str


def work(job: PromptJob, out_dir: Path) -> dict:
    """Score every test text's prompt against each label's verbaliser; writes metrics (beside
    the majority class) and predictions into ``out_dir``."""
    import torch

    spec, labels, model_dir = job.spec, list(job.labels), job.model_dir
    task, prompt = thaw(spec.task), thaw(spec.prompt)
    shots, seed, normalize = spec.shots, spec.seed, spec.normalize
    device, dtype = torch.device(job.device), getattr(torch, spec.dtype)
    splits = load_task(task, Path(spec.data_root), seed=spec.split_seed)
    verbalizers = verbalizer_list(labels, prompt.get("verbalizers"))
    template = str(prompt["template"])
    demos = draw_shots(splits["train"]["text"], splits["train"]["label"], shots, seed)
    prefix = few_shot_prefix(demos, template, verbalizers)
    test = splits["test"]
    prompts = [prefix + template.format(text=t) for t in test["text"]]
    tokenizer = load_tokenizer(model_dir)
    if getattr(tokenizer, "chat_template", None):
        log.info(
            "prompt: %s has a chat template (an instruction-tuned model?); prompt.template "
            "is scored as plain text after BOS, as for a pretrained model",
            model_dir,
        )
    model = load_lm(model_dir, "decoder").to(device=device, dtype=dtype)
    log.info("prompt: scoring %d prompts x %d labels on %s", len(prompts), len(labels), device)
    scores, truncated = score_prompts(
        model,
        tokenizer,
        prompts,
        verbalizers,
        int(prompt["batch_size"]),
        int(prompt["max_length"]),
        normalize,
    )
    pred = scores.argmax(-1).tolist()
    metrics = classification_metrics(list(test["label"]), pred, labels)
    baseline = majority_baseline(list(test["label"]), pred, labels, metrics["macro_f1"])
    write_json_atomic(out_dir / "metrics.json", {"split": "test", **metrics, **baseline})
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
    log.log(
        logging.INFO if baseline["beats_majority"] else logging.WARNING,
        "prompt %s k=%d: macro-F1 %.4f, %s the majority class (always '%s': %.4f); predicted %s",
        task["name"],
        shots,
        metrics["macro_f1"],
        "above" if baseline["beats_majority"] else "NOT above",
        baseline["majority_label"],
        baseline["majority_macro_f1"],
        ", ".join(f"{k} {v}" for k, v in baseline["predicted_counts"].items()),
    )
    scoring = "mean log-prob per verbaliser token" if normalize else "summed log-prob"
    return {
        "metrics": metrics,
        "outputs": ["metrics.json", "predictions.jsonl"],
        "shots_used": [{"text": t, "label": labels[y]} for t, y in demos],
        "verbalizers": dict(zip(labels, verbalizers, strict=True)),
        "scoring": scoring,
        "prompts_truncated": truncated,
        **baseline,
        "device": str(device),
        "dtype": spec.dtype,
        "arm": f"Prompting ({shots}-shot{', normalised' if normalize else ''})",
        "task": str(task["name"]),
    }


def run(cfg: DictConfig) -> dict:
    shots = config_int(cfg, "shots")
    config_int(cfg, "seed")  # checked here: the spec and the work read them typed
    config_bool(cfg, "prompt.normalize")
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
    job = PromptJob(spec, model_dir, tuple(labels), str(device))
    return run_stage(RunContext.of(cfg), spec, [model_input], functools.partial(work, job))
