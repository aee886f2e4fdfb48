"""`cmmerge evaluate`: macro-F1, accuracy, per-class report and confusion matrix of a fine-tuned
model on the test split of its task and of other tasks with the same labels (cross-pair transfer)
-> evaluate/<finetune-id>/<task>/metrics.json, predictions.jsonl. Token-level tasks
(``task.type=token``) are scored over words, and each predictions line holds a sentence's
``words`` with a ``gold`` and a ``pred`` tag per word."""

from __future__ import annotations

import logging
from pathlib import Path

from cmmerge import dist
from cmmerge.config.specs import EvaluateSpec, thaw
from cmmerge.data.tasks import load_task_with_info
from cmmerge.data.token_tasks import is_token_task
from cmmerge.io.manifest import write_json_atomic, write_jsonl_atomic
from cmmerge.training.finetune import predict
from cmmerge.training.token_classification import predict_tokens

log = logging.getLogger("cmmerge")


def work(spec: EvaluateSpec, stage_dir: Path) -> dict:
    """Score the fine-tuned model ``spec.model`` on the test split of ``spec.task`` into
    ``stage_dir`` (metrics and one predictions line per test example); the spec is all it
    reads."""
    task = thaw(spec.task)
    task_name, labels, ft_id = spec.task_name, list(spec.labels), spec.model.folder_id
    model_dir = spec.model.folder / "model"
    splits, info = load_task_with_info(task, Path(spec.data_root), seed=spec.split_seed)
    test = splits["test"]
    sizes = int(spec.evaluate["batch_size"]), int(spec.evaluate["max_length"])
    if is_token_task(task):  # word-level metrics; a predictions line per sentence, tag per word
        words, gold = list(test["words"]), list(test["word_labels"])
        preds, _, metrics = predict_tokens(
            model_dir, words, labels, *sizes, gold, stage_dir / ".predict"
        )
        rows = (
            {
                "text": text,
                "words": w,
                "gold": [labels[i] for i in g],
                "pred": [labels[i] for i in p],
            }
            for text, w, g, p in zip(test["text"], words, gold, preds, strict=True)
        )
        scores = f"word macro-F1 {metrics['macro_f1']:.4f}"
        scores += f", accuracy {metrics['accuracy']:.4f} ({metrics['n']} words)"
    else:
        texts, gold = list(test["text"]), list(test["label"])
        probs, metrics = predict(model_dir, texts, labels, *sizes, gold, stage_dir / ".predict")
        rows = (
            {
                "text": text,
                "gold": labels[g],
                "pred": labels[int(p.argmax())],
                "probs": {lab: round(float(v), 6) for lab, v in zip(labels, p, strict=True)},
            }
            for text, g, p in zip(texts, gold, probs, strict=True)
        )
        scores = f"macro-F1 {metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f}"
    if not dist.is_main():
        return {"metrics": metrics}
    write_json_atomic(stage_dir / "metrics.json", {"split": "test", **metrics})
    write_jsonl_atomic(stage_dir / "predictions.jsonl", rows)
    log.info("evaluate %s on %s: %s", ft_id, task_name, scores)
    return {
        "metrics": metrics,
        "outputs": ["metrics.json", "predictions.jsonl"],
        "finetune_id": ft_id,
        "task": task_name,
        "test_blank_dropped": info["test"].get("blank_dropped", 0),
    }
