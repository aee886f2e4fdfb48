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


def pack_examples(
    batch: dict[str, list[list[int]]],
    block_size: int,
    bos_id: int | None = None,
    pad_id: int = 0,
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function: token lists -> blocks of ``block_size``.

    Without ``bos_id`` (a model that does not start texts with BOS): documents are
    concatenated and cut into full blocks; the first token of each document gets label -100
    (it is not predicted from the previous document); a document cut by a block boundary
    continues in the next block with its own positions; the tail shorter than a block is
    dropped.

    With ``bos_id`` (a model that expects BOS, as Gemma and Llama do): no document is cut,
    since a piece that starts mid-text without BOS is text the model never sees (Gemma-3-270M
    scored such blocks far worse than the same texts one at a time). Each document starts
    with BOS (added where the tokenizer left it out) and blocks are filled with whole
    documents, longest first, each into the block it fills best; what is left of a block is
    ``pad_id`` with label -100, in a segment of its own. A document longer than a block is
    split into pieces that each start with BOS, the first token after an added BOS unscored.
    The packed loss is then exactly the loss of the documents one at a time.
    """
    if bos_id is None:
        return _cut_blocks(batch["input_ids"], block_size)
    docs: list[tuple[list[int], list[int]]] = []
    for doc in batch["input_ids"]:
        docs += _bos_pieces(doc, block_size, bos_id)
    out: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": []}
    for block in _fill(sorted(docs, key=lambda d: len(d[0]), reverse=True), block_size):
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        for doc, doc_labels in block:
            ids += doc
            pos += range(len(doc))
            labels += doc_labels
        free = block_size - len(ids)
        out["input_ids"].append(ids + [pad_id] * free)
        out["position_ids"].append(pos + list(range(free)))
        out["labels"].append(labels + [IGNORE_INDEX] * free)
    return out


def _cut_blocks(docs: list[list[int]], block_size: int) -> dict[str, list]:
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for doc in docs:
        ids += doc
        pos += range(len(doc))
        labels += [IGNORE_INDEX, *doc[1:]]
    n = len(ids) // block_size * block_size
    return {
        "input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)],
        "position_ids": [pos[i : i + block_size] for i in range(0, n, block_size)],
        "labels": [labels[i : i + block_size] for i in range(0, n, block_size)],
    }


def _bos_pieces(doc: list[int], block_size: int, bos_id: int) -> list[tuple[list[int], list[int]]]:
    """``doc`` with BOS in front, as (tokens, labels) pieces of at most ``block_size`` tokens
    that each start with BOS; BOS is never scored, nor the first token of a continuation piece
    (it does not follow its real context). Empty for a document of BOS alone."""
    body = doc[1:] if doc and doc[0] == bos_id else list(doc)
    step = max(block_size - 1, 1)
    pieces = []
    for i in range(0, len(body), step):
        part = body[i : i + step]
        labels = [IGNORE_INDEX, *part] if i == 0 else [IGNORE_INDEX, IGNORE_INDEX, *part[1:]]
        pieces.append(([bos_id, *part], labels))
    return pieces


def _fill(docs: list[tuple[list[int], list[int]]], block_size: int) -> list[list[tuple]]:
    """Best-fit packing of ``docs`` (longest first) into blocks of ``block_size``: each goes to
    the open block it leaves the least room in, or a new one."""
    by_room: list[list[int]] = [[] for _ in range(block_size + 1)]  # room -> open blocks
    blocks: list[list[tuple]] = []
    room: list[int] = []
    for doc in docs:
        need = len(doc[0])
        target = next((r for r in range(need, block_size) if by_room[r]), None)
        if target is None:
            blocks.append([])
            room.append(block_size)
            b = len(blocks) - 1
        else:
            b = by_room[target].pop()
        blocks[b].append(doc)
        room[b] -= need
        by_room[room[b]].append(b)
    return blocks


def add_bos(dataset: Dataset, bos_id: int, max_length: int) -> Dataset:
    """``dataset`` (tokenised: ``input_ids`` and its aligned columns) with BOS in front of each
    text that lacks it, cut back to ``max_length``; unchanged when every text has it."""
    if all(ids[:1] == [bos_id] for ids in dataset["input_ids"]):
        return dataset
    columns = [
        c
        for c in ("input_ids", "attention_mask", "special_tokens_mask")
        if c in dataset.column_names
    ]
    first = {"input_ids": bos_id, "attention_mask": 1, "special_tokens_mask": 1}

    def prepend(example: dict) -> dict:
        if example["input_ids"][:1] == [bos_id]:
            return example
        return {c: [first[c], *example[c]][:max_length] for c in columns}

    return dataset.map(prepend, desc="adding BOS")


def packing_options(tokenizer, config) -> dict[str, int]:
    """:func:`pack_examples`'s ``bos_id`` and ``pad_id`` for a model: BOS where the tokenizer
    has one and the model expects it (its tokenizer puts it in front of a text, or its config
    names a ``bos_token_id``); empty (cut packing) otherwise."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return {}
    adds = tokenizer("a")["input_ids"][:1] == [bos] or bool(getattr(tokenizer, "add_bos_token", 0))
    if not adds and getattr(config, "bos_token_id", None) is None:
        return {}
    pad = tokenizer.pad_token_id
    return {"bos_id": int(bos), "pad_id": int(bos if pad is None else pad)}


def pack_dataset(
    dataset: Dataset, block_size: int, docs_per_map: int = 2000, **options: int
) -> Dataset:
    """Pack a tokenised dataset (``input_ids`` column) into blocks of ``block_size`` tokens;
    ``options``: :func:`packing_options` (BOS at every document, no document cut)."""
    packed = dataset.map(
        pack_examples,
        batched=True,
        batch_size=docs_per_map,
        remove_columns=dataset.column_names,
        fn_kwargs={"block_size": block_size, **options},
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
