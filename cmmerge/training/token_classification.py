"""Token classification (one label per word, e.g. language identification) with the Trainer:
best epoch by validation macro-F1 over words, as :mod:`cmmerge.training.finetune` does for
sentences.

Words are tokenised with ``is_split_into_words=True`` (fast tokenizers: ``word_ids()``); the
label of a word sits on its first sub-token, every other sub-token and the special tokens get
-100 (ignored by the loss and the metrics). A sentence longer than ``max_length`` sub-tokens is
cut into consecutive chunks of whole words that fit, so every word is trained on and predicted
(a single word longer than that keeps its first sub-tokens). Tokenisation is cached on disk,
keyed by the words, the tokenizer and ``max_length``; labels are attached afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from transformers import (
    DataCollatorForTokenClassification,
)

from cmmerge.data.stats import tokenizer_fingerprint
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.metrics import classification_metrics
from cmmerge.evaluation.token_metrics import token_metrics, trainer_token_metrics
from cmmerge.models.loading import check_max_length, load_token_classifier, load_tokenizer
from cmmerge.training import lora
from cmmerge.training.arguments import (
    seed_everything,
)
from cmmerge.training.finetune import (
    EvaluationRecorder,
    class_weights,
    predict_logits,
    run_trainer,
    weighted_loss,
)

IGNORE = -100
_MODEL_COLUMNS = ("input_ids", "attention_mask")


def word_chunks(counts: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive word ranges ``[start, end)`` whose sub-token counts add up to at most
    ``budget`` each (a word longer than ``budget`` is a range of its own)."""
    chunks, start, used = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and used + n > budget:
            chunks.append((start, i))
            start, used = i, 0
        used += n
    chunks.append((start, len(counts)))
    return chunks


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise CmmergeError(
            f"token-level tasks need a fast tokenizer (word_ids()); {tokenizer.name_or_path} "
            f"has {type(tokenizer).__name__}: save the model with its tokenizer.json"
        )


def encode_words(
    words: list[list[str]], indices: list[int], tokenizer, max_length: int
) -> dict[str, list]:
    """Sub-token ids of sentences given as words, in chunks of at most ``max_length``.

    Returns:
        Columns of one row per chunk: ``input_ids``, ``attention_mask``, ``word_ids`` (the
        chunk's word index of each sub-token, -1 for special tokens), ``sentence`` (from
        ``indices``) and ``first_word`` (index in the sentence of the chunk's first word).
    """
    budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    bare = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    pieces, owners = [], []
    for i, sentence in enumerate(words):
        counts = [0] * len(sentence)
        for w in bare.word_ids(i):
            if w is not None:
                counts[w] += 1
        for start, end in word_chunks(counts, budget):
            pieces.append(sentence[start:end])
            owners.append((indices[i], start))
    enc = tokenizer(pieces, is_split_into_words=True, truncation=True, max_length=max_length)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "word_ids": [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(pieces))],
        "sentence": [s for s, _ in owners],
        "first_word": [f for _, f in owners],
    }


def tokenize_words(
    ds: datasets.Dataset, tokenizer, max_length: int, cache_dir: Path | None = None
) -> datasets.Dataset:
    """:func:`encode_words` over the ``words`` column of ``ds`` (batched ``datasets.map``),
    cached under ``cache_dir/tokenized`` by the words, the tokenizer and ``max_length``."""
    _require_fast(tokenizer)
    words = ds.select_columns(["words"])

    def encode(batch, indices):
        return encode_words(batch["words"], indices, tokenizer, max_length)

    kwargs: dict[str, Any] = {"keep_in_memory": True}
    if cache_dir is not None:
        h = hashlib.sha256(f"words|{tokenizer_fingerprint(tokenizer)}|{max_length}".encode())
        for sentence in words["words"]:
            h.update("\x1f".join(sentence).encode("utf-8", "surrogatepass") + b"\0")
        folder = Path(cache_dir) / "tokenized"
        folder.mkdir(parents=True, exist_ok=True)
        kwargs = {
            "load_from_cache_file": True,
            "cache_file_name": str(folder / f"words-{h.hexdigest()[:24]}.arrow"),
            "desc": "tokenising words",
        }
    return words.map(
        encode, batched=True, batch_size=1000, with_indices=True, remove_columns=["words"], **kwargs
    )


def aligned_labels(chunks: datasets.Dataset, word_labels: Sequence[Sequence[int]]) -> list:
    """Per chunk, the label of each sub-token: the word's label on its first sub-token, -100 on
    its other sub-tokens and on special tokens."""
    out = []
    for word_ids, sentence, first in zip(
        chunks["word_ids"], chunks["sentence"], chunks["first_word"], strict=True
    ):
        gold, row, previous = word_labels[sentence], [], -1
        for w in word_ids:
            row.append(IGNORE if w == -1 or w == previous else int(gold[first + w]))
            previous = w
        out.append(row)
    return out


def training_split(
    ds: datasets.Dataset, tokenizer, max_length: int, cache_dir: Path | None
) -> datasets.Dataset:
    """``input_ids``, ``attention_mask`` and aligned ``labels`` of a split's chunks."""
    chunks = tokenize_words(ds, tokenizer, max_length, cache_dir)
    labels = aligned_labels(chunks, ds["word_labels"])
    return chunks.select_columns(list(_MODEL_COLUMNS)).add_column("labels", labels)


def word_predictions(
    chunks: datasets.Dataset, logits: np.ndarray, words_per_sentence: Sequence[int]
) -> tuple[list[list[int]], list[list[np.ndarray]], int]:
    """Per sentence, the predicted label id and probabilities of each word (from its first
    sub-token), and how many words had no sub-token (they take the previous word's label, or
    label 0)."""
    n_labels = logits.shape[-1]
    probs: list[list[np.ndarray | None]] = [[None] * n for n in words_per_sentence]
    for row, (word_ids, sentence, first) in enumerate(
        zip(chunks["word_ids"], chunks["sentence"], chunks["first_word"], strict=True)
    ):
        previous = -1
        for pos, w in enumerate(word_ids):
            if w != -1 and w != previous:
                scores = torch.softmax(torch.as_tensor(logits[row, pos], dtype=torch.float32), -1)
                probs[sentence][first + w] = scores.numpy()
            previous = w
    missing, preds, filled = 0, [], []
    for sentence in probs:
        last = np.eye(n_labels, dtype=np.float32)[0]
        row_pred, row_probs = [], []
        for p in sentence:
            if p is None:
                missing += 1
                p = last
            row_pred.append(int(p.argmax()))
            row_probs.append(p)
            last = p
        preds.append(row_pred)
        filled.append(row_probs)
    return preds, filled, missing


class _WordEvaluations(EvaluationRecorder):
    """:class:`EvaluationRecorder` over words: the kept epoch's metrics carry the sentence
    count and ``unit: word``."""

    def __init__(self, labels: list[str], n_sentences: int) -> None:
        super().__init__(labels)
        self.n_sentences = n_sentences

    def compute(self, eval_pred) -> dict[str, float]:
        scalars, gold, pred = trainer_token_metrics(eval_pred)
        full = classification_metrics(gold, pred, self.labels)
        per_class, matrix = full.pop("per_class"), full.pop("confusion_matrix")
        self._last = {
            **full,
            "n_sentences": self.n_sentences,
            "unit": "word",
            "per_class": per_class,
            "confusion_matrix": matrix,
        }
        return scalars


def train_token_classifier(
    init_dir: Path,
    splits: DatasetDict,
    labels: list[str],
    params: Mapping[str, Any],
    out_dir: Path,
    seed: int,
    peft_cfg: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``init_dir`` as a token classifier on ``splits['train']`` (columns ``words``,
    ``word_labels``); keeps the epoch best on validation macro-F1 over words.

    Saves as :func:`cmmerge.training.finetune.train_classifier` does (``out_dir/model``, with
    LoRA also ``out_dir/adapter``) and returns the same keys: the kept model's validation
    metrics (word level) and training facts. ``seed`` is set before the model is built.
    """
    seed_everything(seed, bool(params.get("full_determinism", False)))
    tokenizer = load_tokenizer(init_dir)
    _require_fast(tokenizer)
    model = load_token_classifier(init_dir, labels, tokenizer.pad_token_id)
    max_length = int(params["max_length"])
    check_max_length(model.config, max_length, "finetune.max_length", init_dir)
    if lora.enabled(peft_cfg):
        model = lora.wrap(model, peft_cfg, "token_cls")
    train = training_split(splits["train"], tokenizer, max_length, cache_dir)
    validation = training_split(splits["validation"], tokenizer, max_length, cache_dir)
    words = [i for ids in splits["train"]["word_labels"] for i in ids]  # balanced over words
    weights = class_weights(words, len(labels), params.get("class_weights"))
    facts = run_trainer(
        model,
        tokenizer,
        train,
        validation,
        DataCollatorForTokenClassification(tokenizer),
        _WordEvaluations(labels, len(splits["validation"])),
        loss_func=weighted_loss(weights) if weights is not None else None,
        params=params,
        out_dir=out_dir,
        seed=seed,
        peft_cfg=peft_cfg,
    )
    return {**facts, "chunks": {"train": len(train), "validation": len(validation)}}


def predict_tokens(
    model_dir: Path,
    words: list[list[str]],
    labels: list[str],
    batch_size: int,
    max_length: int,
    gold: list[list[int]],
    work_dir: Path,
) -> tuple[list[list[int]], list[list[np.ndarray]], dict]:
    """The predicted label id and probabilities of every word of every sentence, and the
    word-level metrics against ``gold`` (``words_without_tokens`` counts words no sub-token
    stands for)."""
    tokenizer = load_tokenizer(model_dir)
    _require_fast(tokenizer)
    model = load_token_classifier(model_dir, labels, tokenizer.pad_token_id)
    check_max_length(model.config, max_length, "evaluate.max_length", model_dir)
    ds = datasets.Dataset.from_dict({"words": words, "word_labels": gold})
    chunks = tokenize_words(ds, tokenizer, max_length)
    data = chunks.select_columns(list(_MODEL_COLUMNS)).add_column(
        "labels", aligned_labels(chunks, gold)
    )
    logits, loss = predict_logits(
        model, tokenizer, data, DataCollatorForTokenClassification(tokenizer), batch_size, work_dir
    )
    preds, probs, missing = word_predictions(chunks, logits, [len(w) for w in words])
    metrics = token_metrics(gold, preds, labels)
    metrics["loss"] = loss
    metrics["words_without_tokens"] = missing
    return preds, probs, metrics
