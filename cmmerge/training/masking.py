"""Masked-LM masks that a resumed CPT draws exactly as an uninterrupted one does."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, TrainerCallback


class ResumableMLMCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling`` whose masks for a batch come from a generator seeded
    by ``(seed, epoch, the batch's padded token ids)``.

    The stock collator with a ``seed`` draws every batch from one generator that no checkpoint
    saves, so a resumed run replays the first batches' masks; without a seed it draws from the
    global RNG, which the Trainer restores on resume only after it has collated the first batch
    (and the one its data loader prefetches). Seeding each batch by its content gives it the same
    masks however the run got there. :class:`MaskEpochCallback` sets ``epoch`` so that a text
    gets new masks in each epoch (dynamic masking), as with the stock collator.
    """

    epoch: int = 0

    def batch_seed(self, input_ids: torch.Tensor) -> int:
        """The seed of one batch's masks: a hash of the seed, the epoch and the token ids."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(f"{self.seed}|{self.epoch}|{tuple(input_ids.shape)}|".encode())
        digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") >> 1

    def create_rng(self, return_tensors: str | None = None) -> None:
        """A placeholder generator (each batch seeds its own): the stock one refuses to seed in a
        process other than ``MainProcess`` outside a DataLoader worker, e.g. a joblib worker
        that runs a sweep job."""
        self.generator = self.get_generator(self.seed, return_tensors)
        self._generator_pid = os.getpid()

    def torch_mask_tokens(
        self, inputs: Any, special_tokens_mask: Any | None = None, offset_mapping: Any | None = None
    ) -> tuple[Any, Any]:
        self.generator = torch.Generator().manual_seed(self.batch_seed(inputs))
        self._generator_pid = os.getpid()
        return super().torch_mask_tokens(inputs, special_tokens_mask, offset_mapping)


class MaskEpochCallback(TrainerCallback):
    """Tell a :class:`ResumableMLMCollator` which epoch it collates (also after a resume, when
    the Trainer restores ``state.epoch`` from the checkpoint)."""

    def __init__(self, collator: ResumableMLMCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
