"""The mergekit configuration that computes the same merge as cmmerge's, written beside every
merged model (``mergekit.yaml``), so a reader can check the result with mergekit itself."""

from __future__ import annotations

from pathlib import Path

import yaml

from cmmerge.merging.methods import get_method


def mergekit_yaml(
    method: str,
    scale: float,
    params: dict,
    weights: list[float],
    base: Path,
    sources: list[Path],
    dtype: str,
) -> str | None:
    """A mergekit config computing the same merge, or None where mergekit has no equivalent
    (task-vector files, ``trim_scope=model``, ``sign=count``, DARE's rescaling...)."""
    name = get_method(method).mergekit
    if (
        name is None
        or params.get("trim_scope", "tensor") != "tensor"
        or params.get("sign", "sum") != "sum"
        or (name == "linear" and scale != 1)
    ):
        return None
    models = []
    for path, weight in zip(sources, weights, strict=True):
        p = {"weight": weight}
        if "density" in params:
            p["density"] = params["density"]
        models.append({"model": str(path), "parameters": p})
    config: dict = {"merge_method": name, "models": models, "dtype": dtype}
    if name == "linear":
        config["parameters"] = {"normalize": params["normalize"]}
    else:
        config["base_model"] = str(base)
        config["parameters"] = {"lambda": scale, "normalize": params["normalize"]}
    return yaml.safe_dump(config, sort_keys=False)
