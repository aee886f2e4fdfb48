"""`cmmerge prompt`: zero/few-shot prompting of a decoder ->
prompt/<model>-<init>-<task>-k<shots>-s<seed>[-norm]/ (``-norm``: length-normalised scores)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cmmerge.config.specs import PromptSpec, thaw
from cmmerge.data.tasks import load_task
from cmmerge.evaluation.baseline import majority_macro_f1
from cmmerge.evaluation.metrics import classification_metrics
from cmmerge.evaluation.prompting import (
    draw_shots,
    few_shot_prefix,
    score_prompts,
    verbalizer_list,
)
from cmmerge.io.manifest import write_json_atomic, write_jsonl_atomic
from cmmerge.models.loading import load_lm, load_tokenizer

log = logging.getLogger("cmmerge")


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
