"""Merge math: plain functions over same-shape float32 task vectors, and the method registry.

A method is a *trim* (``magnitude``: keep the top-``density`` entries; ``random``: DARE's
seeded drop with ``1/density`` rescaling; or none) followed by a *combine* (``weighted_sum``,
or ``disjoint_merge``: TIES sign election and disjoint mean). ``apply_delta`` adds
``lambda * combined`` to the base. The operations run in mergekit's order, so with the same
settings ``task_arithmetic`` and ``ties`` equal mergekit's to float32 rounding (bitwise for one
source). The streaming engine calls the same functions on chunks. They work on numpy arrays
(a torch tensor on the CPU is taken as one) and return numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cmmerge.errors import CmmergeError
from cmmerge.merging.select import keep_count, threshold_of, trim_mask

SIGN_METHODS = ("sum", "count")
TRIM_SCOPES = ("tensor", "model")


def validate_density(density: float) -> float:
    """Return ``density`` as a float if it lies in (0, 1], else raise CmmergeError naming it."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise CmmergeError(f"density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise CmmergeError(f"density must be in (0, 1], got {density!r}")
    return value


def magnitude_trim(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``k = max(1, int(density * numel))`` entries of largest magnitude (mergekit's k),
    zero the rest; ties at the threshold keep the lowest flat indices. ``density >= 1`` returns
    ``delta`` itself. Exact top-k without a sort (histogram + selection, see ``select``)."""
    delta = np.asarray(delta)
    if density >= 1 or delta.size == 0:
        return delta
    flat = delta.reshape(-1).astype(np.float32)
    k = keep_count(density, flat.size)
    threshold = threshold_of([flat], k)
    return (flat * trim_mask(flat, threshold, 0)).reshape(delta.shape).astype(delta.dtype)


def dare_keep(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    """DARE's mask: each entry kept with probability ``density``, drawn from torch's generator
    seeded with ``seed`` (imported only for DARE), so a seed gives the same mask as ever."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand(shape, generator=g) < density).numpy()


def random_drop(delta: np.ndarray, density: float, seed: int = 0) -> np.ndarray:
    """DARE: keep each entry with probability ``density`` (:func:`dare_keep`) and rescale the
    kept ones by ``1 / density`` (the DARE paper's rescaling; mergekit rescales to the L1 norm
    instead)."""
    delta = np.asarray(delta)
    if density >= 1:
        return delta
    return delta * dare_keep(delta.shape, density, seed) * np.float32(1.0 / density)


def _weights_like(weights: Sequence[float], ref: np.ndarray) -> np.ndarray:
    return np.array([float(w) for w in weights], dtype=ref.dtype).reshape(-1, *[1] * ref.ndim)


def _check(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> None:
    if len(deltas) == 0:
        raise CmmergeError("no task vectors to combine")
    if len(deltas) != len(weights):
        raise CmmergeError(f"{len(deltas)} task vectors but {len(weights)} weights")
    for d in deltas[1:]:
        if d.shape != deltas[0].shape:
            raise CmmergeError(
                f"task vector shapes differ: {tuple(deltas[0].shape)} vs {tuple(d.shape)}"
            )


def weighted_sum(
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    normalize: bool = False,
    sign: str = "sum",
) -> np.ndarray:
    """``sum_i w_i d_i``, divided by ``sum_i w_i`` when ``normalize`` (a weight sum of magnitude
    below 1e-8 counts as 1, as in mergekit). ``sign`` is ignored. May reuse ``deltas[0]``."""
    deltas = [np.asarray(d) for d in deltas]
    _check(deltas, weights)
    if len(deltas) == 1:  # the same float ops as the stacked form, without the copies
        w, out = float(weights[0]), deltas[0]
        if w != 1:
            out = out * out.dtype.type(w)
            if normalize and abs(w) >= 1e-8:
                out /= out.dtype.type(w)
        return out
    w = _weights_like(weights, deltas[0])
    merged = (np.stack(deltas) * w).sum(axis=0)
    if normalize:
        divisor = w.sum(axis=0)
        divisor[np.abs(divisor) < 1e-8] = 1
        merged /= divisor
    return merged


def disjoint_merge(
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    normalize: bool = True,
    sign: str = "sum",
) -> np.ndarray:
    """TIES after trimming: elect a sign per entry from the weighted deltas (``sum``: sign of
    their sum; ``count``: the sign most of them hold; ties elect +), keep the weighted entries
    of that sign (zeros never agree) and sum them, divided by the sum of their weights when
    ``normalize`` (disjoint mean; an entry with none divides by 1)."""
    deltas = [np.asarray(d) for d in deltas]
    _check(deltas, weights)
    if sign not in SIGN_METHODS:
        raise CmmergeError(f"sign must be one of {', '.join(SIGN_METHODS)}, got {sign!r}")
    if len(deltas) == 1:  # every nonzero entry agrees with itself: the same float ops, no stack
        w, out = float(weights[0]), deltas[0]
        if w == 0:
            return np.zeros_like(out)
        if w != 1:
            out = out * out.dtype.type(w)
            if normalize:
                out /= out.dtype.type(w)
        return out
    w = _weights_like(weights, deltas[0])
    weighted = np.stack(deltas) * w
    signs = np.sign(weighted)
    votes = weighted.sum(axis=0) if sign == "sum" else signs.sum(axis=0)
    elected = (votes >= 0).astype(weighted.dtype) * 2 - 1
    mask = (signs == elected).astype(weighted.dtype)
    merged = (weighted * mask).sum(axis=0)
    if normalize:
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1
        merged /= divisor
    return merged


def apply_delta(base: np.ndarray, combined: np.ndarray, scale: float) -> np.ndarray:
    """``base + scale * combined`` as mergekit computes it, written into ``combined`` (returned;
    float addition is commutative, so ``combined + base`` is the same sum bit for bit)."""
    if scale != 1:
        combined *= combined.dtype.type(scale)
    combined += base
    return combined


def task_arithmetic(
    deltas: Sequence[np.ndarray], weights: Sequence[float], normalize: bool = False
) -> np.ndarray:
    """Task arithmetic: ``weighted_sum`` of the task vectors."""
    return weighted_sum([np.array(d) for d in deltas], weights, normalize)


def ties(
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    density: float = 1.0,
    sign: str = "sum",
    normalize: bool = True,
) -> np.ndarray:
    """TIES: ``magnitude_trim`` each delta to ``density``, then ``disjoint_merge``."""
    return disjoint_merge(
        [np.array(magnitude_trim(d, density)) for d in deltas], weights, normalize, sign
    )


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as users name it.

    Attributes:
        name: Canonical name (``task_arithmetic``, ``ties``, ...).
        trim: ``magnitude``, ``random`` (DARE) or None.
        combine: ``combine(deltas, weights, normalize=..., sign=...) -> array``.
        default_normalize: ``normalize`` when the user does not set it (mergekit's default).
        params: Parameters the method takes besides ``normalize``.
        mergekit: mergekit's name for the same computation, or None.
        description: One line for docs and the model card.
    """

    name: str
    trim: str | None
    combine: Callable[..., np.ndarray]
    default_normalize: bool
    params: tuple[str, ...] = ()
    mergekit: str | None = None
    description: str = ""

    def fn(
        self,
        deltas: Sequence[np.ndarray],
        weights: Sequence[float],
        normalize: bool = False,
        density: float = 1.0,
        sign: str = "sum",
        seed: int = 0,
        trim_scope: str = "tensor",
    ) -> np.ndarray:
        """Whole-tensor reference: trim each delta (per tensor), then combine. DARE draws the
        i-th source's mask with seed ``seed + i``."""
        if self.trim == "magnitude":
            deltas = [magnitude_trim(d, density) for d in deltas]
        elif self.trim == "random":
            deltas = [random_drop(d, density, int(seed) + i) for i, d in enumerate(deltas)]
        return self.combine([np.array(d) for d in deltas], weights, normalize=normalize, sign=sign)


_TRIM = ("density", "trim_scope")
_TA = MergeMethod(
    "task_arithmetic",
    None,
    weighted_sum,
    False,
    (),
    "task_arithmetic",
    "weighted sum of task vectors",
)
MERGE_METHODS: dict[str, MergeMethod] = {
    "task_arithmetic": _TA,
    "tv": _TA,
    "ties": MergeMethod(
        "ties",
        "magnitude",
        disjoint_merge,
        True,
        (*_TRIM, "sign"),
        "ties",
        "trim to top-density magnitudes, elect sign, disjoint mean",
    ),
    "dare_linear": MergeMethod(
        "dare_linear",
        "random",
        weighted_sum,
        False,
        ("density", "seed"),
        None,
        "random drop (keep density, rescale 1/density), weighted sum",
    ),
    "dare_ties": MergeMethod(
        "dare_ties",
        "random",
        disjoint_merge,
        False,
        ("density", "seed", "sign"),
        None,
        "random drop (rescale 1/density), elect sign, disjoint sum",
    ),
    "magnitude": MergeMethod(
        "magnitude",
        "magnitude",
        weighted_sum,
        False,
        _TRIM,
        None,
        "trim to top-density magnitudes, weighted sum",
    ),
    "linear": MergeMethod(
        "linear",
        None,
        weighted_sum,
        True,
        (),
        "linear",
        "weighted average of the full weights (normalize=true)",
    ),
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
    names no method knows raise CmmergeError, ``density`` must lie in (0, 1], ``sign`` be
    ``sum|count`` and ``trim_scope`` be ``tensor|model``.

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
    if "density" in method.params:
        kwargs["density"] = validate_density(kwargs.get("density", 1.0))  # type: ignore[arg-type]
    for key, choices in (("sign", SIGN_METHODS), ("trim_scope", TRIM_SCOPES)):
        if key in kwargs and kwargs[key] not in choices:
            raise CmmergeError(f"{key} must be one of {', '.join(choices)}, got {kwargs[key]!r}")
    if "seed" in kwargs:
        kwargs["seed"] = int(kwargs["seed"])  # type: ignore[call-overload]
    kwargs["normalize"] = bool(kwargs["normalize"])
    return kwargs


def combine(
    name: str, deltas: Sequence[np.ndarray], weights: Sequence[float], **params: object
) -> np.ndarray:
    """Combine whole task vectors with method ``name``; see ``resolve_params`` for ``params``."""
    kwargs = resolve_params(name, **params)
    kwargs.pop("trim_scope", None)
    return get_method(name).fn(list(deltas), list(weights), **kwargs)  # type: ignore[arg-type]
