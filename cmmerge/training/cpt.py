"""Continued pre-training: masked LM for encoders, causal LM for decoders, with the Trainer."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer

from cmmerge.errors import CmmergeError
from cmmerge.models.loading import ModelKind, load_lm, load_tokenizer
from cmmerge.training.arguments import training_arguments

log = logging.getLogger("cmmerge")


def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int) -> Dataset:
    """Tokenise with ``datasets.map(batched=True)``; drops texts that tokenise to nothing."""
    ds = Dataset.from_dict({"text": list(texts)})
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length,
                                    return_special_tokens_mask=True),
                batched=True, remove_columns=["text"], desc="tokenising corpus")
    return ds.filter(lambda ex: len(ex["input_ids"]) > 2)


def _collator(tokenizer, kind: ModelKind, mlm_probability: float, seed: int):
    return DataCollatorForLanguageModeling(tokenizer, mlm=kind == "encoder",
                                           mlm_probability=mlm_probability if kind == "encoder"
                                           else None, seed=seed)


def _perplexity(trainer: Trainer, make_collator, eval_ds: Dataset) -> dict[str, float]:
    trainer.data_collator = make_collator()  # same masks before and after training
    loss = float(trainer.evaluate(eval_ds)["eval_loss"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_lm(model_dir: Path, kind: ModelKind, texts: Sequence[str], params: Mapping[str, Any],
             out_dir: Path, seed: int) -> dict[str, Any]:
    """Continue pre-training ``model_dir`` on ``texts``; saves the model to ``out_dir/model``.

    Returns held-out loss and perplexity before and after, and the number of training steps and
    tokens.
    """
    tokenizer = load_tokenizer(model_dir)
    if kind == "encoder" and tokenizer.mask_token is None:
        raise CmmergeError(f"tokenizer in {model_dir} has no mask token: it cannot do masked-LM CPT")
    dataset = tokenize_texts(texts, tokenizer, int(params["max_length"]))
    n_eval = max(1, int(len(dataset) * float(params.get("eval_fraction", 0.05))))
    if len(dataset) - n_eval < int(params["batch_size"]):
        raise CmmergeError(
            f"the corpus has {len(dataset)} usable texts, too few for one batch of "
            f"{params['batch_size']} plus {n_eval} held out; add text or lower cpt.batch_size")
    split = dataset.train_test_split(test_size=n_eval, seed=seed)
    model = load_lm(model_dir, kind)
    mlm_p = float(params.get("mlm_probability", 0.15))

    def make_collator():
        return _collator(tokenizer, kind, mlm_p, seed)

    ckpt_dir = out_dir / "checkpoints"
    args = training_arguments(ckpt_dir, params, seed, eval_strategy="no", save_strategy="no",
                              remove_unused_columns=True)
    trainer = Trainer(model=model, args=args, train_dataset=split["train"],
                      data_collator=make_collator(), processing_class=tokenizer)
    before = _perplexity(trainer, make_collator, split["test"])
    trainer.data_collator = make_collator()
    result = trainer.train()
    after = _perplexity(trainer, make_collator, split["test"])
    model_out = out_dir / "model"
    trainer.save_model(str(model_out))
    tokenizer.save_pretrained(model_out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    n_tokens = sum(len(ids) for ids in split["train"]["input_ids"])
    return {
        "loss": after["loss"],
        "perplexity": after["perplexity"],
        "perplexity_before": before["perplexity"],
        "loss_before": before["loss"],
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "train_texts": len(split["train"]),
        "heldout_texts": len(split["test"]),
        "train_tokens_per_epoch": int(n_tokens),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
    }
