"""Merge math: plain functions over lists of same-shape float32 task vectors, and a registry.

Every function returns the *combined delta*; the caller adds ``scale * combined`` to the base.
With the same settings the results equal mergekit's ``task_arithmetic`` and ``ties``
(``generalized_task_arithmetic``) to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cmmerge.errors import CmmergeError

SIGN_METHODS = ("sum", "count")


def validate_density(density: float) -> float:
    """Return ``density`` as a float if it lies in (0, 1], else raise CmmergeError naming it."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise CmmergeError(f"density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise CmmergeError(f"density must be in (0, 1], got {density!r}")
    return value


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density * numel)`` entries of largest magnitude, zero the rest.

    Args:
        delta: Any-shape tensor.
        density: Fraction kept. ``>= 1`` returns ``delta`` itself; ``k == 0`` gives all zeros.

    Returns:
        Tensor of ``delta``'s shape with exactly ``k`` entries kept (ties broken as torch.topk).
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def _stack(deltas: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Stack deltas to ``(n, *shape)`` and weights to ``(n, 1, ..., 1)`` (same dtype/device)."""
    if len(deltas) == 0:
        raise CmmergeError("no task vectors to combine")
    if len(deltas) != len(weights):
        raise CmmergeError(f"{len(deltas)} task vectors but {len(weights)} weights")
    shape = deltas[0].shape
    for d in deltas[1:]:
        if d.shape != shape:
            raise CmmergeError(f"task vector shapes differ: {tuple(shape)} vs {tuple(d.shape)}")
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    return stacked, w.view(-1, *([1] * len(shape)))


def task_arithmetic(
    deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool = False
) -> Tensor:
    """Weighted sum ``sum_i w_i * d_i``, divided by ``sum_i w_i`` when ``normalize``.

    A weight sum with magnitude below 1e-8 is treated as 1 (as mergekit does).
    """
    stacked, w = _stack(deltas, weights)
    merged = (stacked * w).sum(dim=0)
    if normalize:
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        merged = merged / divisor
    return merged


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    sign: str = "sum",
    normalize: bool = True,
) -> Tensor:
    """TIES: trim each delta, elect a sign per element, average the agreeing entries.

    Args:
        deltas: n tensors of one shape.
        weights: n per-source weights.
        density: Fraction of each delta kept by ``magnitude_trim``.
        sign: ``"sum"`` elects the sign of the weighted sum; ``"count"`` the sign held by most
            sources. Ties (and an all-zero column) elect +1.
        normalize: Divide by the sum of the weights of the agreeing sources (disjoint mean).

    Returns:
        The combined delta, before the caller's ``lambda``.
    """
    if sign not in SIGN_METHODS:
        raise CmmergeError(f"sign must be one of {', '.join(SIGN_METHODS)}, got {sign!r}")
    trimmed = [magnitude_trim(d, density) for d in deltas]
    stacked, w = _stack(trimmed, weights)
    weighted = stacked * w
    signs = weighted.sign()
    votes = weighted.sum(dim=0) if sign == "sum" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    mask = (signs == elected).to(weighted.dtype)  # a zero never agrees with +-1
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return merged


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as users name it.

    Attributes:
        name: Canonical name (``task_arithmetic``, ``ties``).
        fn: The math: ``fn(deltas, weights, normalize=..., **params) -> Tensor``.
        default_normalize: ``normalize`` when the user does not set it.
        params: Extra parameters the method takes (besides ``normalize``).
    """

    name: str
    fn: Callable[..., Tensor]
    default_normalize: bool
    params: tuple[str, ...] = ()


_TASK_ARITHMETIC = MergeMethod("task_arithmetic", task_arithmetic, default_normalize=False)
_TIES = MergeMethod("ties", ties, default_normalize=True, params=("density", "sign"))

MERGE_METHODS: dict[str, MergeMethod] = {
    "task_arithmetic": _TASK_ARITHMETIC,
    "tv": _TASK_ARITHMETIC,
    "ties": _TIES,
}

_KNOWN_PARAMS = {"normalize"} | {p for m in MERGE_METHODS.values() for p in m.params}


def get_method(name: str) -> MergeMethod:
    """Look a method up by the name users type; unknown names raise CmmergeError."""
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        choices = ", ".join(MERGE_METHODS)
        raise CmmergeError(f"unknown merge method {name!r}; choose one of: {choices}") from None


def resolve_params(name: str, **params: object) -> dict[str, object]:
    """Validate and complete the keyword arguments for method ``name``.

    ``None`` values are dropped (defaults apply), parameters that the method does not take
    (e.g. ``density`` for task_arithmetic, so one sweep grid serves all methods) are ignored,
    names no method knows raise CmmergeError, and ``density`` is checked to lie in (0, 1].

    Returns:
        Keyword arguments for ``get_method(name).fn`` including ``normalize``.
    """
    method = get_method(name)
    unknown = sorted(set(params) - _KNOWN_PARAMS)
    if unknown:
        raise CmmergeError(f"unknown merge parameter(s) {', '.join(unknown)} for {name!r}")
    kwargs: dict[str, object] = {"normalize": method.default_normalize}
    for key, value in params.items():
        if value is None or (key != "normalize" and key not in method.params):
            continue
        kwargs[key] = value
    if "density" in kwargs:
        kwargs["density"] = validate_density(kwargs["density"])  # type: ignore[arg-type]
    if "sign" in kwargs and kwargs["sign"] not in SIGN_METHODS:
        raise CmmergeError(f"sign must be one of {', '.join(SIGN_METHODS)}, got {kwargs['sign']!r}")
    kwargs["normalize"] = bool(kwargs["normalize"])
    return kwargs


def combine(
    name: str, deltas: Sequence[Tensor], weights: Sequence[float], **params: object
) -> Tensor:
    """Combine task vectors with method ``name``; see ``resolve_params`` for ``params``."""
    kwargs = resolve_params(name, **params)
    return get_method(name).fn(list(deltas), list(weights), **kwargs)
