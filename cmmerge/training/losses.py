"""Language-model losses that never build the full ``[tokens x vocab]`` logits tensor.

* **Masked LM**: the model's own MLM head runs only on the positions whose label is not -100
  (~15% of them), through a forward pre-hook on the head, so the standard ``*ForMaskedLM`` object,
  its forward and its checkpoint layout stay as they are.
* **Causal LM**: a pre-hook on the output embeddings (``lm_head``) takes the final hidden states
  and hands the head an empty slice; the loss is then computed over chunks of the target rows.
  A plain ``nn.Linear`` head goes through a fused linear + cross-entropy autograd function that
  computes each chunk's gradients in the forward pass (no recomputation, one chunk of logits at a
  time); any other head (LoRA-wrapped, with post-processing) goes through per-chunk
  ``torch.utils.checkpoint``.

Both losses equal the models' default ones: a mean over the non-ignored targets, or the sum over
``num_items_in_batch`` when the Trainer passes it (gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmmerge.errors import CmmergeError

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024


def mlm_head(model: nn.Module) -> nn.Module:
    """The MLM head of a ``*ForMaskedLM`` model: its top-level child that holds the output
    embeddings (``cls`` for BERT, ``lm_head`` for RoBERTa/XLM-R, ``vocab_projector`` for
    DistilBERT, ``generator_lm_head`` for ELECTRA)."""
    if hasattr(model, "get_base_model"):  # a peft model: the transformers model inside it
        model = model.get_base_model()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise CmmergeError(
            f"{type(model).__name__} has no output embeddings: no MLM head to "
            "apply to masked positions; set cpt.fast_loss=false"
        )
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for child in model.children():
        if child is not base and any(m is out for m in child.modules()):
            return child
    raise CmmergeError(
        f"{type(model).__name__}: cannot find the module around its output "
        "embeddings; set cpt.fast_loss=false"
    )


@contextmanager
def _replace_head_input(
    head: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], model_name: str
) -> Iterator[None]:
    """While active, ``head(hidden, ...)`` runs as ``head(fn(hidden), ...)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args or not torch.is_tensor(args[0]):
            raise CmmergeError(
                f"{model_name}: its head is not called with hidden states as the "
                "first argument; set cpt.fast_loss=false"
            )
        return (fn(args[0]), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _check_shape(hidden: torch.Tensor, labels: torch.Tensor, model_name: str) -> None:
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise CmmergeError(
            f"{model_name}: its head sees hidden states of shape "
            f"{tuple(hidden.shape)}, not [batch, length, hidden] like the labels "
            f"{tuple(labels.shape)}; set cpt.fast_loss=false"
        )


def _normalise(
    loss_sum: torch.Tensor, n_targets: int, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """Sum over ``num_items_in_batch`` if given (the Trainer's gradient accumulation), else mean;
    a batch without targets gives 0, not NaN."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    return loss_sum / max(n_targets, 1)


def masked_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    head: nn.Module | None = None,
) -> tuple[torch.Tensor, Any]:
    """MLM loss with the head applied to the masked positions only.

    Args:
        model: a ``*ForMaskedLM`` model (possibly wrapped by accelerate; ``head`` then comes from
            the unwrapped one).
        inputs: the model's inputs without ``labels`` (input_ids, attention_mask, ...).
        labels: ``[batch, length]`` token ids, -100 where no prediction is scored.
        num_items_in_batch: divide the summed loss by this instead of the number of targets.
        head: the MLM head module; found with :func:`mlm_head` if not given.

    Returns:
        The loss and the model's outputs, whose ``logits`` are ``[n_masked, vocab]``.
    """
    name = type(model).__name__
    head = head if head is not None else mlm_head(model)
    mask = labels.ne(IGNORE_INDEX)

    def gather(hidden: torch.Tensor) -> torch.Tensor:
        _check_shape(hidden, labels, name)
        return hidden[mask.to(hidden.device)]

    with _replace_head_input(head, gather, name):
        outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    targets = labels[mask].to(logits.device)
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum"
    )
    return _normalise(loss_sum, int(targets.numel()), num_items_in_batch), outputs


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a causal LM does to ``lm_head``'s output before its loss (Gemma's soft-capping,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``); None when nothing."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    if cap is None and scale is None and divide is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk;
    the gradients are computed in the forward pass and only scaled in the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:  # noqa: D102
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                logits = F.linear(h, w, b).float()  # [chunk, vocab]: the one big buffer
                target_logit = logits.gather(1, t[:, None])
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # in place: no second [chunk, vocab] tensor
                norm = probs.sum(dim=-1, keepdim=True)
                total += (norm.log() + top - target_logit).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = probs.div_(norm)  # softmax
                grad[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = grad @ w
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)
                elif need_w:  # a half-precision product, as autocast's own backward does
                    grad_w += (grad.t() @ h).float()
                if need_b:
                    grad_b += grad.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # noqa: D102
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("the fused linear cross-entropy supports one backward pass only")
        ctx.backward_done = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # in place: the buffers serve this one backward pass
        out_h = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
        out_b = grad_b.mul_(grad_out).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``transform(head(hidden))`` against ``targets``, at most
    ``chunk_size`` rows of logits at a time.

    Args:
        hidden: ``[n, hidden]`` hidden states of the scored positions.
        head: the output layer; a plain ``nn.Linear`` takes the fused path.
        targets: ``[n]`` token ids (no -100).
        chunk_size: rows of logits materialised at once.
        transform: applied to the logits before the loss (e.g. soft-capping).
    """
    if chunk_size < 1:
        raise CmmergeError(f"cpt.loss_chunk_size must be >= 1, got {chunk_size}")
    grad = torch.is_grad_enabled()
    if type(head) is nn.Linear and transform is None and grad:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size)

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if transform is not None:
            logits = transform(logits)
        return F.cross_entropy(logits.float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + (
            checkpoint(chunk_loss, h, t, use_reentrant=False) if grad else chunk_loss(h, t)
        )
    return total


def causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    shift_labels: torch.Tensor | None = None,
    unwrapped: nn.Module | None = None,
) -> torch.Tensor:
    """Next-token loss of a ``*ForCausalLM`` model without the full logits tensor.

    Args:
        model: the model to call (possibly wrapped); ``unwrapped`` is the bare one if it differs.
        inputs: the model's inputs without ``labels`` (input_ids, attention_mask, position_ids).
        labels: ``[batch, length]``, -100 where not scored; shifted by one as the default loss
            does (position t predicts ``labels[t + 1]``), unless ``shift_labels`` is given.
        num_items_in_batch: divide the summed loss by this instead of the number of targets.
        chunk_size: rows of logits materialised at once.
        shift_labels: already-shifted targets, ``[batch, length]``.
    """
    bare = unwrapped if unwrapped is not None else model
    name = type(bare).__name__
    head = bare.get_output_embeddings()
    if head is None:
        raise CmmergeError(f"{name} has no output embeddings; set cpt.fast_loss=false")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        _check_shape(hidden, shift_labels, name)
        captured.append(hidden)
        return hidden[:, :0]  # the head computes nothing

    with _replace_head_input(head, capture, name):
        model(**{**inputs, "use_cache": False})
    hidden = captured[0]
    valid = shift_labels.ne(IGNORE_INDEX).to(hidden.device)
    targets = shift_labels.to(hidden.device)[valid]
    loss_sum = chunked_cross_entropy(
        hidden[valid], head, targets, chunk_size, logit_transform(getattr(bare, "config", None))
    )
    return _normalise(loss_sum, int(targets.numel()), num_items_in_batch)
