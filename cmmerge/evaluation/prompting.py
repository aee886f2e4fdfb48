"""Zero- and few-shot prompting of a decoder: each label's verbaliser scored by log-likelihood.

Only the logits that predict verbaliser tokens are computed and normalised (the model's
``logits_to_keep``): a batch costs [batch, verbaliser length, vocab], never
[batch, prompt length, vocab], which matters with Llama's 128k vocabulary.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cmmerge.errors import CmmergeError

log = logging.getLogger("cmmerge")


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


def fit_prompt(prompt_ids: list[int], n_verb: int, max_length: int, lead: int) -> list[int]:
    """``prompt_ids`` cut so that it and ``n_verb`` verbaliser tokens fit in ``max_length``.

    The first ``lead`` tokens (BOS and other leading special tokens) and the end of the prompt
    (the text being classified and the template's cue, e.g. ``Sentiment:``) are kept; tokens are
    dropped from the middle (the earliest demonstrations, then the start of the text).
    """
    room = max_length - n_verb
    if room < 1:
        raise CmmergeError(
            f"a verbaliser of {n_verb} tokens leaves no room for the prompt in "
            f"prompt.max_length={max_length}: raise prompt.max_length or shorten the verbaliser"
        )
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    lead = min(lead, room - 1)  # keep at least one token of the prompt's end
    return list(prompt_ids[:lead]) + list(prompt_ids[len(prompt_ids) - (room - lead) :])


def _leading_specials(ids: list[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def encode_rows(
    tokenizer, prompts: Sequence[str], verbalizers: Sequence[str], max_length: int
) -> tuple[list[tuple[list[int], int]], int]:
    """One row ``(prompt ids + verbaliser ids, verbaliser length)`` per (prompt, verbaliser),
    prompt-major, each at most ``max_length`` tokens; and how many prompts were truncated."""
    special = set(tokenizer.all_special_ids)
    verb_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    # a tokenizer that adds BOS even without special tokens would score BOS inside the answer
    verb_ids = [ids[_leading_specials(ids, special) :] for ids in verb_ids]
    for text, ids in zip(verbalizers, verb_ids, strict=True):
        if not ids:
            raise CmmergeError(f"verbaliser {text!r} has no tokens: give it a word to score")
    if prompts:
        check_verbalizers(tokenizer, prompts[0], verbalizers, verb_ids)
    rows: list[tuple[list[int], int]] = []
    truncated = 0
    for prompt in prompts:
        p_ids = tokenizer(prompt)["input_ids"]
        lead = _leading_specials(p_ids, special)
        cut = False
        for v in verb_ids:
            kept = fit_prompt(p_ids, len(v), max_length, lead)
            cut = cut or len(kept) < len(p_ids)
            rows.append((kept + v, len(v)))
        truncated += cut
    return rows, truncated


def check_verbalizers(
    tokenizer, prompt: str, verbalizers: Sequence[str], verb_ids: Sequence[list[int]]
) -> list[str]:
    """Warn (and return the verbalisers) whose tokens after ``prompt`` are not the ones the
    tokenizer gives the joined text ``prompt + verbaliser``: a scored answer the model would
    never see in running text (a missing leading space, a word split differently at the
    join). Scores of such verbalisers mislead; fix them with prompt.verbalizers."""
    p_ids = tokenizer(prompt)["input_ids"]
    odd = []
    for text, ids in zip(verbalizers, verb_ids, strict=True):
        joined = tokenizer(prompt + text)["input_ids"]
        if joined != p_ids + list(ids):
            odd.append(text)
            log.warning(
                "prompt: verbaliser %r is scored as tokens %s, but after the prompt the "
                "tokenizer reads it as %s: set prompt.verbalizers (e.g. with a leading space) "
                "so that they agree",
                text,
                tokenizer.convert_ids_to_tokens(list(ids)),
                tokenizer.convert_ids_to_tokens(joined[_common_prefix(joined, p_ids) :]),
            )
    return odd


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _forward_kwargs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.inference_mode()
def score_rows(
    model, rows: Sequence[tuple[list[int], int]], pad_id: int, batch_size: int = 16
) -> np.ndarray:
    """Summed log-probability of each row's last ``n`` tokens given the tokens before them.

    Rows are batched by length and left-padded, so every row's verbaliser ends at the last
    position; logits are computed for the last ``k`` predicting positions only
    (``k`` = the batch's longest verbaliser), log-softmaxed in float32, and gathered.
    """
    model.eval()
    device = next(model.parameters()).device
    accepted = _forward_kwargs(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    scores = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        k = max(rows[i][1] for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        targets = torch.zeros((len(idx), k), dtype=torch.long)
        mask = torch.zeros((len(idx), k), dtype=torch.bool)
        for b, i in enumerate(idx):
            ids, n = rows[i]
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention[b, width - len(ids) :] = 1
            targets[b, k - n :] = torch.tensor(ids[-n:])
            mask[b, k - n :] = True
        extra: dict = {"use_cache": False}
        if "logits_to_keep" in accepted:  # the lm head runs on these k + 1 positions only
            extra["logits_to_keep"] = k + 1
        if "position_ids" in accepted:  # left padding: positions count real tokens only
            extra["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0).to(device)
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), **extra
        ).logits
        # position p predicts token p + 1: the k positions before the last one
        logprobs = torch.log_softmax(logits[:, -(k + 1) : -1].float(), dim=-1)
        picked = logprobs.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1).cpu()
        scores[idx] = picked.masked_fill(~mask, 0.0).sum(-1).double().numpy()
    return scores


def score_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    verbalizers: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    normalize: bool = False,
) -> tuple[np.ndarray, int]:
    """Log-likelihood of each verbaliser after each prompt: ([n_prompts, n_labels], number of
    prompts truncated).

    The verbaliser's tokens are appended to the prompt's, so the score is exactly
    ``sum_j log p(v_j | prompt, v_<j)``; ``normalize=True`` divides it by the verbaliser's
    length (mean log-probability per token), which stops long verbalisers losing by length.
    A prompt too long for ``max_length`` loses tokens from its middle (see :func:`fit_prompt`).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, truncated = encode_rows(tokenizer, prompts, verbalizers, max_length)
    if truncated:
        log.warning(
            "prompt: %d of %d prompts were longer than prompt.max_length=%d and lost tokens "
            "from their middle (the start and the end are kept)",
            truncated,
            len(prompts),
            max_length,
        )
    scores = score_rows(model, rows, pad, batch_size)
    if normalize:
        scores = scores / np.array([n for _, n in rows], dtype=np.float64)
    return scores.reshape(len(prompts), len(verbalizers)), truncated


def score_verbalizers(
    model,
    tokenizer,
    prompts: Sequence[str],
    verbalizers: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    normalize: bool = False,
) -> np.ndarray:
    """The scores of :func:`score_prompts` alone: array [n_prompts, n_labels]."""
    return score_prompts(model, tokenizer, prompts, verbalizers, batch_size, max_length, normalize)[
        0
    ]


def inference_device(choice: str | None = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; or ``cpu``, ``cuda``, ``cuda:1``..."""
    name = str(choice or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CmmergeError(f"prompt.device={name}: no CUDA GPU here; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise CmmergeError(f"prompt.device={name}: {err}") from None


def inference_dtype(choice: str | None, device: torch.device) -> torch.dtype:
    """Weights' dtype for scoring: ``auto`` is bfloat16 on GPUs that support it, float32
    elsewhere; ``fp32``, ``bf16``, ``fp16`` force one (log-softmax is float32 either way)."""
    name = str(choice or "auto").lower()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in dtypes:
        raise CmmergeError(f"prompt.precision={choice}: choose one of auto, fp32, bf16, fp16")
    return dtypes[name]


def verbalizer_list(labels: Sequence[str], mapping: Mapping[str, str] | None) -> list[str]:
    """The word scored for each label: ``mapping[label]`` or `` <label>``."""
    mapping = mapping or {}
    return [str(mapping.get(label, f" {label}")) for label in labels]
