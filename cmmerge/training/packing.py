"""Sequence packing for causal-LM CPT: documents concatenated into full blocks of ``max_length``,
attention kept inside each document through ``position_ids`` that restart at every document.

transformers builds a block-diagonal causal mask from such ``position_ids`` when no
``attention_mask`` is given (``masking_utils.find_packed_sequence_indices``: sdpa and eager) and
uses variable-length kernels for flash attention; :func:`packing_keeps_documents_apart` checks it
on the model at hand, since not every architecture goes through that code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from cmmerge.training.losses import IGNORE_INDEX

log = logging.getLogger("cmmerge")


def pack_examples(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list]:
    """``datasets.map(batched=True)`` function: token lists -> blocks of ``block_size``.

    The first token of each document gets label -100 (it is not predicted from the previous
    document); a document cut by a block boundary continues in the next block with its own
    positions. The tail shorter than a block is dropped.
    """
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for doc in batch["input_ids"]:
        ids += doc
        pos += range(len(doc))
        labels += [IGNORE_INDEX, *doc[1:]]
    n = len(ids) // block_size * block_size
    return {
        "input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)],
        "position_ids": [pos[i : i + block_size] for i in range(0, n, block_size)],
        "labels": [labels[i : i + block_size] for i in range(0, n, block_size)],
    }


def pack_dataset(dataset: Dataset, block_size: int, docs_per_map: int = 2000) -> Dataset:
    """Pack a tokenised dataset (``input_ids`` column) into blocks of ``block_size`` tokens."""
    packed = dataset.map(
        pack_examples,
        batched=True,
        batch_size=docs_per_map,
        remove_columns=dataset.column_names,
        fn_kwargs={"block_size": block_size},
        desc="packing",
    )
    if len(packed) == 0:  # a corpus shorter than one block: one block of everything
        packed = dataset.map(
            pack_examples,
            batched=True,
            batch_size=None,
            remove_columns=dataset.column_names,
            fn_kwargs={"block_size": sum(len(x) for x in dataset["input_ids"])},
        )
    return packed


def packing_keeps_documents_apart(
    model: nn.Module, doc_length: int = 6, atol: float = 1e-4
) -> bool:
    """Whether ``model`` attends only within a document when fed packed ``position_ids``.

    Runs two short token sequences packed in one row and the second one alone; true when the
    second one's logits agree.
    """
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    first = torch.arange(1, doc_length + 1) * 7 % vocab
    second = torch.arange(1, doc_length + 1) * 13 % vocab
    positions = torch.arange(doc_length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(
                input_ids=torch.cat([first, second])[None].to(device),
                position_ids=torch.cat([positions, positions])[None].to(device),
                use_cache=False,
            ).logits[0, doc_length:]
            alone = model(
                input_ids=second[None].to(device),
                position_ids=positions[None].to(device),
                use_cache=False,
            ).logits[0]
        return bool(torch.allclose(packed.float(), alone.float(), atol=atol, rtol=1e-3))
    except Exception as err:  # noqa: BLE001 - any failure means "not supported"
        log.info("packing probe failed on %s: %s", type(model).__name__, err)
        return False
    finally:
        model.train(was_training)


def packing_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks packed blocks; no ``attention_mask``, so the model derives the document mask from
    ``position_ids``."""
    return {
        k: torch.tensor([f[k] for f in features], dtype=torch.long)
        for k in ("input_ids", "position_ids", "labels")
    }
