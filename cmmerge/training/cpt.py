"""Continued pre-training: masked LM for encoders, causal LM for decoders, with the Trainer.

With ``cpt.fast_loss`` (default) the loss comes from :mod:`cmmerge.training.losses` (MLM head on
the masked positions only; chunked causal-LM loss); with ``cpt.packing`` (default for decoders)
documents are packed into full blocks (:mod:`cmmerge.training.packing`). The model stays the
standard ``*ForMaskedLM`` / ``*ForCausalLM``, so the saved checkpoint is the same either way.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import DataCollatorForLanguageModeling, Trainer

from cmmerge import dist
from cmmerge.data.stats import tokenize_cached
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import write_json_atomic
from cmmerge.models.loading import ModelKind, check_max_length, load_lm, load_tokenizer
from cmmerge.training import lora
from cmmerge.training.arguments import (
    FiniteLossCallback,
    LogCallback,
    activation_checkpointing,
    precision_name,
    readable_output,
    seed_everything,
    training_arguments,
    whole_run_loss,
)
from cmmerge.training.losses import (
    DEFAULT_CHUNK_SIZE,
    causal_lm_loss,
    masked_lm_loss,
    mlm_head,
)
from cmmerge.training.masking import MaskEpochCallback, ResumableMLMCollator
from cmmerge.training.packing import (
    add_bos,
    pack_dataset,
    packing_collator,
    packing_keeps_documents_apart,
    packing_options,
)

log = logging.getLogger("cmmerge")


def tokenize_texts(
    texts: Sequence[str], tokenizer, max_length: int, cache_dir: Path | None = None
) -> Dataset:
    """Tokenise with batched ``datasets.map``, cached on disk under ``cache_dir`` (a second run
    on the same corpus and tokenizer loads it); drops texts that tokenise to nothing."""
    ds = Dataset.from_dict({"text": list(texts)})
    ds = tokenize_cached(ds, tokenizer, max_length, cache_dir, return_special_tokens_mask=True)
    ds = ds.remove_columns(["text"])
    return ds.filter(lambda ex: len(ex["input_ids"]) > 2)


def _collator(tokenizer, kind: ModelKind, mlm_probability: float, seed: int, wwm: bool = False):
    """Masks for encoders (the same in a resumed run: :class:`ResumableMLMCollator`), labels
    for decoders."""
    if kind == "decoder":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return ResumableMLMCollator(
        tokenizer, mlm=True, mlm_probability=mlm_probability, whole_word_mask=wwm, seed=seed
    )


def _resumable_checkpoint(ckpt_dir: Path, identity: dict) -> str | None:
    """The last complete checkpoint in ``ckpt_dir`` left by an interruption of this very run
    (same model, data and settings), or None. Stale checkpoints of another run, and one cut off
    while it was being written (no ``trainer_state.json``), are removed."""
    marker = ckpt_dir / "cmmerge-run.json"
    same = marker.exists() and json.loads(marker.read_text()) == identity
    complete = []
    if dist.is_main():
        if not same:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(identity, sort_keys=True))
        for ckpt in ckpt_dir.glob("checkpoint-*"):
            if not (ckpt / "trainer_state.json").exists():
                shutil.rmtree(ckpt, ignore_errors=True)
    dist.barrier()
    if same:
        complete = [c for c in ckpt_dir.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    if not complete:
        return None
    return str(max(complete, key=lambda c: int(c.name.rsplit("-", 1)[-1])))


class CptTrainer(Trainer):
    """Trainer whose loss is :func:`masked_lm_loss` or :func:`causal_lm_loss` (``fast_loss``),
    or the model's own (``fast_loss=False``)."""

    def __init__(
        self,
        *args: Any,
        kind: ModelKind,
        fast_loss: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.fast_loss, self.chunk_size = kind, fast_loss, chunk_size

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The fast loss, normalised like the default one (see the class docstring of Trainer:
        a loss divided by ``num_items_in_batch`` counts as scaled for gradient accumulation)."""
        if not self.fast_loss or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        bare = self.accelerator.unwrap_model(model)
        if self.kind == "encoder":
            loss, outputs = masked_lm_loss(
                model, inputs, labels, num_items_in_batch, head=mlm_head(bare)
            )
        else:
            loss = causal_lm_loss(
                model,
                inputs,
                labels,
                num_items_in_batch,
                self.chunk_size,
                shift_labels,
                unwrapped=bare,
            )
            outputs = {"loss": loss}
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def use_packing(params: Mapping[str, Any], kind: ModelKind, model: nn.Module) -> bool:
    """``cpt.packing`` (null: true for decoders), where the model keeps packed documents apart."""
    wanted = params.get("packing")
    wanted = kind == "decoder" if wanted is None else bool(wanted)
    if not wanted:
        return False
    if kind == "encoder":
        log.info("cpt.packing applies to causal-LM decoders only: encoder texts stay unpacked")
        return False
    if not packing_keeps_documents_apart(model):
        log.warning(
            "%s does not keep packed documents apart (attention %s): training without packing",
            type(model).__name__,
            getattr(model.config, "_attn_implementation", "?"),
        )
        return False
    return True


def _perplexity(trainer: Trainer, make_collator, eval_ds: Dataset) -> dict[str, float]:
    trainer.data_collator = make_collator()  # same masks before and after training
    loss = float(trainer.evaluate(eval_ds)["eval_loss"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _perplexity_before(
    trainer: Trainer, make_collator, eval_ds: Dataset, ckpt_dir: Path, resume: str | None
) -> dict[str, float]:
    """The held-out loss before training, measured once per run: a resumed run reads it from
    its checkpoint folder (which only a run with the same identity keeps) instead of spending a
    second pass over the held-out texts."""
    saved = ckpt_dir / "perplexity_before.json"
    if resume and saved.exists():
        return json.loads(saved.read_text())
    before = _perplexity(trainer, make_collator, eval_ds)
    if dist.is_main():
        write_json_atomic(saved, before)
    return before


def check_head_warmup(params: Mapping[str, Any], kind: ModelKind, peft_cfg) -> int:
    """``cpt.head_warmup_steps``, refused in one line where it does not apply."""
    steps = int(params.get("head_warmup_steps") or 0)
    if steps < 0:
        raise CmmergeError(f"cpt.head_warmup_steps={steps}: give 0 (none) or a number of steps")
    if steps and (kind != "encoder" or lora.enabled(peft_cfg)):
        raise CmmergeError(
            "cpt.head_warmup_steps applies to full-parameter masked-LM CPT of an encoder "
            "(a checkpoint saved without its MLM head); set it to 0 for this model or peft=none"
        )
    return steps


def _warm_up_head(
    trainer: CptTrainer, collator, steps: int, params: Mapping[str, Any], seed: int
) -> dict:
    """Train the MLM head of ``trainer``'s model alone for ``steps`` (the encoder and the tied
    embeddings frozen), on the same batches the CPT then starts from (``collator``: a fresh one
    with the CPT's seed, so the CPT's own masks are unchanged). A head initialised at random (a
    model saved without one, as multilingual-e5) otherwise sends its first, largest gradients
    through the encoder. Returns the warm-up's steps and mean loss."""
    model = trainer.model
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    head = {id(p) for p in mlm_head(model).parameters() if id(p) not in tied}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    args = training_arguments(
        Path(trainer.args.output_dir) / "head_warmup",
        {**params, "max_steps": steps, "lr": params.get("head_warmup_lr") or params["lr"]},
        seed,
        eval_strategy="no",
        save_strategy="no",
        prediction_loss_only=True,
        remove_unused_columns=True,
    )
    warm = CptTrainer(
        model=model,
        args=args,
        train_dataset=trainer.train_dataset,
        data_collator=collator,
        processing_class=trainer.processing_class,
        kind=trainer.kind,
        fast_loss=trainer.fast_loss,
        chunk_size=trainer.chunk_size,
        callbacks=[LogCallback(), FiniteLossCallback()],
    )
    readable_output(warm)
    log.info("warming up the MLM head alone for %d steps (%d tensors frozen)", steps, len(frozen))
    for param in frozen:
        param.requires_grad_(False)
    try:
        result = warm.train()
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return {"head_warmup_steps": steps, "head_warmup_loss": float(result.training_loss)}


def train_lm(
    model_dir: Path,
    kind: ModelKind,
    texts: Sequence[str],
    params: Mapping[str, Any],
    out_dir: Path,
    seed: int,
    peft_cfg: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Continue pre-training ``model_dir`` on ``texts``; saves the model to ``out_dir/model``.

    With LoRA (``peft_cfg``) the adapter is kept in ``out_dir/adapter`` and merged into the full
    weights saved in ``out_dir/model``. Checkpoints every ``save_steps`` let an interrupted run
    resume where it stopped. Returns held-out loss and perplexity before and after, and the
    number of training steps and tokens. ``cache_dir`` keeps the tokenised corpus.
    """
    warmup_steps = check_head_warmup(params, kind, peft_cfg)
    tokenizer = load_tokenizer(model_dir)
    if kind == "encoder" and tokenizer.mask_token is None:
        raise CmmergeError(
            f"tokenizer in {model_dir} has no mask token: it cannot do masked-LM CPT"
        )
    # before the model is built: a bare encoder (BertModel) gets a new MLM head
    seed_everything(seed, bool(params.get("full_determinism", False)))
    dataset = tokenize_texts(texts, tokenizer, int(params["max_length"]), cache_dir)
    n_eval = max(1, int(len(dataset) * float(params.get("eval_fraction", 0.05))))
    if len(dataset) - n_eval < int(params["batch_size"]):
        raise CmmergeError(
            f"the corpus has {len(dataset)} usable texts, too few for one batch of "
            f"{params['batch_size']} plus {n_eval} held out; add text or lower cpt.batch_size"
        )
    split = dataset.train_test_split(test_size=n_eval, seed=seed)
    model = load_lm(model_dir, kind)
    check_max_length(model.config, int(params["max_length"]), "cpt.max_length", model_dir)
    if lora.enabled(peft_cfg):
        model = lora.wrap(model, peft_cfg, "causal_lm" if kind == "decoder" else "masked_lm")
    mlm_p = float(params.get("mlm_probability", 0.15))
    packed = use_packing(params, kind, model)
    fast_loss = bool(params.get("fast_loss", True))
    n_tokens = sum(len(ids) for ids in split["train"]["input_ids"])
    n_texts = {name: len(split[name]) for name in ("train", "test")}
    # BOS at every document start where the model expects it (Gemma: 7.43 held-out loss with
    # it vs 9.53 on blocks cut mid-text without it)
    options = packing_options(tokenizer, model.config) if kind == "decoder" else {}
    block = int(params["max_length"])
    if packed:
        split = {name: pack_dataset(split[name], block, **options) for name in ("train", "test")}
        log.info(
            "packed %d training tokens into %d blocks of %d%s",
            n_tokens,
            len(split["train"]),
            block,
            " (whole documents, each after BOS)" if options else "",
        )
    elif options:
        split = {name: add_bos(split[name], options["bos_id"], block) for name in split}

    def make_collator():
        if packed:
            return packing_collator
        return _collator(tokenizer, kind, mlm_p, seed, bool(params.get("whole_word_mask")))

    ckpt_dir = out_dir / "checkpoints"
    identity = {
        "model": str(model_dir),
        "params": dict(params),
        "seed": seed,
        "texts": len(texts),
        "peft": dict(peft_cfg or {}),
    }
    resume = _resumable_checkpoint(ckpt_dir, identity)
    save_steps = int(params.get("save_steps") or 0)
    args = training_arguments(
        ckpt_dir,
        params,
        seed,
        eval_strategy="no",
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=max(save_steps, 1),
        save_total_limit=1,
        save_only_model=False,  # optimizer and scheduler state too, to resume exactly
        prediction_loss_only=True,  # held-out loss only: no [masked, vocab] logits gathered
        **activation_checkpointing(bool(params.get("gradient_checkpointing"))),
        remove_unused_columns=True,
    )
    train_collator = make_collator()
    callbacks: list = [LogCallback(), FiniteLossCallback()]
    if isinstance(train_collator, ResumableMLMCollator):
        callbacks.append(MaskEpochCallback(train_collator))
    trainer = CptTrainer(
        model=model,
        args=args,
        train_dataset=split["train"],
        data_collator=train_collator,
        processing_class=tokenizer,
        kind=kind,
        fast_loss=fast_loss,
        chunk_size=int(params.get("loss_chunk_size") or DEFAULT_CHUNK_SIZE),
        callbacks=callbacks,
    )
    readable_output(trainer)  # one line per logged step, no raw dicts
    before = _perplexity_before(trainer, make_collator, split["test"], ckpt_dir, resume)
    warmed: dict[str, Any] = {}
    if warmup_steps and not resume:  # a checkpoint holds the warmed head already
        warmed = _warm_up_head(trainer, make_collator(), warmup_steps, params, seed)
    trainer.data_collator = train_collator
    if resume:
        log.info("resuming CPT from the last checkpoint, %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    after = _perplexity(trainer, make_collator, split["test"])
    train_loss = whole_run_loss(trainer.state.log_history)
    lora.save_trained(trainer, tokenizer, out_dir, peft_cfg)
    return {
        "loss": after["loss"],
        "perplexity": after["perplexity"],
        "perplexity_before": before["perplexity"],
        "loss_before": before["loss"],
        # the whole run's mean, also after a resume (the Trainer's covers this call only)
        "train_loss": float(result.training_loss if train_loss is None else train_loss),
        "steps": int(result.global_step),
        "resumed_at_step": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "train_texts": n_texts["train"],
        "heldout_texts": n_texts["test"],
        "train_tokens_per_epoch": int(n_tokens),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "precision": precision_name(args),
        "fast_loss": fast_loss,
        "packing": packed,
        "resumed": resume is not None,
        "lora": lora.enabled(peft_cfg),
        **warmed,
    }
