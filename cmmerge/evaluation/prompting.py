"""Zero- and few-shot prompting of a decoder: each label's verbaliser scored by log-likelihood."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def few_shot_prefix(
    examples: Sequence[tuple[str, int]], template: str, verbalizers: Sequence[str]
) -> str:
    """Demonstrations ``template(text) + verbaliser`` separated by blank lines."""
    return "".join(f"{template.format(text=t)}{verbalizers[y]}\n\n" for t, y in examples)


def draw_shots(texts: Sequence[str], labels: Sequence[int], k: int, seed: int) -> list:
    """``k`` training examples drawn with ``seed``, cycling through the labels so each appears."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(int(y), []).append(i)
    for ids in by_label.values():
        rng.shuffle(ids)
    order = sorted(by_label)
    picked = [by_label[order[j % len(order)]][j // len(order)] for j in range(k)]
    rng.shuffle(picked)
    return [(texts[i], int(labels[i])) for i in picked]


@torch.no_grad()
def score_verbalizers(
    model,
    tokenizer,
    prompts: Sequence[str],
    verbalizers: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    reduce: str = "sum",
) -> np.ndarray:
    """Log-likelihood of each verbaliser after each prompt: array [n_prompts, n_labels].

    The verbaliser's tokens are appended to the prompt's (left-truncated to ``max_length``), so
    the score is exactly ``sum_j log p(v_j | prompt, v_<j)`` (``reduce="mean"`` divides by the
    verbaliser's length).
    """
    model.eval()
    device = next(model.parameters()).device
    verb_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[tuple[list[int], int]] = []  # (ids, number of verbaliser tokens)
    for prompt in prompts:
        p_ids = tokenizer(prompt)["input_ids"]
        for v in verb_ids:
            keep = max_length - len(v)
            rows.append((p_ids[-keep:] + v, len(v)))
    scores = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, (ids, n_verb) in enumerate(chunk):
            positions = torch.arange(len(ids) - n_verb, len(ids))
            targets = torch.tensor(ids[-n_verb:])
            total = logprobs[i, positions - 1, targets].sum().item()
            scores[start + i] = total / n_verb if reduce == "mean" else total
    return scores.reshape(len(prompts), len(verbalizers))


def verbalizer_list(labels: Sequence[str], mapping: Mapping[str, str] | None) -> list[str]:
    """The word scored for each label: ``mapping[label]`` or `` <label>``."""
    mapping = mapping or {}
    return [str(mapping.get(label, f" {label}")) for label in labels]
