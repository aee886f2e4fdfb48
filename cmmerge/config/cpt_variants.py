"""Which CPT a downstream stage reads when the user did not name one.

A run directory may hold several CPT variants side by side (``cpt/en-hi/``,
``cpt/en-hi-f822eb/`` made with ``cpt.max_steps=4``, ...). A later command (``extract``,
``merge``, ``finetune init=cpt|merged``, ``evaluate``, ``graft``, ``report``, ``status``) that
gives no ``cpt.*`` key takes the one finished variant made for the same model, corpus, LoRA
setting and data; when several are there it refuses and lists them with the override that picks
each (``cpt.id=<id>``). Explicit keys always win: ``cpt.id=<id>``, any ``cpt.*`` key, or an
experiment that sets them. The chosen variant's recorded ``cpt`` settings are put into the
config, so every folder id and fingerprint is derived exactly as if the user had typed them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from cmmerge.config.specs import CptSpec
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import output_view, read_manifest

# A variant must have been made with the same values of these view entries as the config.
MATCH_KEYS = ("model", "corpus", "peft", "data_root", "split_seed")
ID_KEYS = ("cpt.id", "cpt")  # cpt.id=<id> and cpt=<id>: taken off the command line by the CLI


@dataclass(frozen=True)
class Variant:
    """A finished CPT folder of the run directory and the config view it recorded."""

    folder_id: str
    view: dict

    @property
    def settings(self) -> dict:
        """The CPT settings that change its output (what the fingerprint hashes)."""
        return output_view({"cpt": dict(self.view.get("cpt") or {})})["cpt"]


def take_id(overrides: list[str]) -> tuple[list[str], str | None]:
    """``overrides`` without ``cpt.id=X`` / ``cpt=X``, and X (None when not given)."""
    rest, chosen = [], None
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") in ID_KEYS:
            chosen = value.strip()
        else:
            rest.append(item)
    return rest, chosen


def given_cpt_keys(overrides: list[str]) -> dict[str, Any]:
    """The CPT settings the command line gives (``cpt.*``, and those of an experiment), by key."""
    from cmmerge.presets import load_group_config

    given: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key.startswith("cpt."):
            given[key.removeprefix("cpt.")] = _value(value)
        elif key == "experiment" and value:
            node = load_group_config("experiment", value)
            section = node.get("cpt") if isinstance(node, DictConfig) else None
            if isinstance(section, DictConfig):
                given = {**OmegaConf.to_container(section), **given}
    return given


def finished_variants(run_dir: Path) -> list[Variant]:
    """Every finished, complete CPT folder of ``run_dir``, by folder name."""
    out = []
    for folder in sorted((Path(run_dir) / "cpt").glob("*")):
        manifest = read_manifest(folder)
        if not isinstance(manifest, dict) or manifest.get("stage") != "cpt":
            continue
        if transaction.problem(folder, manifest) is not None:
            continue
        if isinstance(manifest.get("config"), dict):
            out.append(Variant(folder.name, manifest["config"]))
    return out


def matching(cfg: DictConfig, variants: list[Variant]) -> list[Variant]:
    """The variants made for the config's model, corpus, LoRA setting and data."""
    wanted = CptSpec.from_config(cfg).config_view()
    return [v for v in variants if all(v.view.get(k) == wanted.get(k) for k in MATCH_KEYS)]


def differing(variants: list[Variant]) -> dict[str, dict[str, object]]:
    """``{folder id: {setting: value}}`` for the CPT settings in which the variants differ."""
    keys = sorted({k for v in variants for k in v.settings})
    varied = [k for k in keys if len({repr(v.settings.get(k)) for v in variants}) > 1]
    return {v.folder_id: {k: v.settings.get(k) for k in varied} for v in variants}


def describe(variants: list[Variant]) -> str:
    """``en-hi (max_steps=-1; cpt.id=en-hi), en-hi-f822eb (max_steps=4; cpt.id=en-hi-f822eb)``."""
    parts = []
    for folder_id, diff in differing(variants).items():
        settings = ", ".join(f"{k}={v}" for k, v in diff.items())
        parts.append(f"{folder_id} ({settings + '; ' if settings else ''}cpt.id={folder_id})")
    return ", ".join(parts)


def adopt(cfg: DictConfig, variant: Variant) -> None:
    """Put ``variant``'s recorded CPT settings into ``cfg`` (keys it did not record keep theirs)."""
    recorded = OmegaConf.create(dict(variant.view.get("cpt") or {}))
    with open_dict(cfg):
        cfg.cpt = OmegaConf.merge(cfg.cpt, recorded)
    made = CptSpec.from_config(cfg).folder_id
    if made != variant.folder_id:  # a variant made by another version of cmmerge
        raise CmmergeError(
            f"cpt/{variant.folder_id} cannot be picked by its recorded settings (they name "
            f"cpt/{made} now): give its cpt.* keys as it was made, or make it again"
        )


def needs_cpt(stage: str, cfg: DictConfig) -> bool:
    """Whether ``stage`` with this config reads a CPT of the run directory."""
    if stage in ("extract", "graft", "report", "status"):
        return True
    sources = [str(s) for s in (cfg.get("sources") or ["cpt"])]
    if stage == "merge":
        return not cfg.get("output") and not cfg.get("base") and "cpt" in sources
    if stage in ("finetune", "evaluate"):
        init = str(cfg.get("init", "base"))
        return init in ("cpt", "graft") or (init == "merged" and "cpt" in sources)
    return False


def resolve(
    stage: str,
    cfg: DictConfig,
    chosen: str | None,
    given: dict[str, Any] | None = None,
    strict: bool = True,
) -> str | None:
    """Point ``cfg.cpt`` at the CPT variant this command reads; a note for the closing line.

    ``chosen`` is ``cpt.id=`` from the command line; ``given`` the ``cpt.*`` keys it gives:
    they win (a finished CPT they name is used as it is), and they narrow the variants when
    they name none. With ``strict`` false (``report``, ``status``) an ambiguous choice leaves
    the config as it is instead of refusing.
    """
    if not needs_cpt(stage, cfg):
        return None
    spec = CptSpec.from_config(cfg)
    if given and chosen is None and read_manifest(spec.folder) is not None:
        return None
    variants = finished_variants(spec.run_dir)
    run_dir = spec.run_dir
    candidates = [v for v in matching(cfg, variants) if _agrees(v, given or {})]
    if chosen is not None:
        picked = [v for v in variants if v.folder_id == chosen]
        if not picked:
            names = ", ".join(v.folder_id for v in variants) or "none"
            raise CmmergeError(
                f"cpt.id={chosen}: no finished CPT {run_dir / 'cpt' / chosen} "
                f"(finished CPTs there: {names})"
            )
        if picked[0] not in candidates:
            differ = _mismatch(cfg, picked[0])
            raise CmmergeError(
                f"cpt.id={chosen} was made with other settings than this command's ({differ}): "
                "give the same model, corpus, peft and data keys"
            )
        adopt(cfg, picked[0])
        return f"cpt {chosen} (cpt.id)"
    if len(candidates) == 1:
        adopt(cfg, candidates[0])
        return f"cpt {candidates[0].folder_id}, the run's only CPT for these settings"
    if given and not candidates:
        return None  # the keys name a CPT not made yet: the stage says so
    if len(candidates) > 1 and strict:
        raise CmmergeError(
            f"{run_dir} has {len(candidates)} CPT variants for this model and corpus: "
            f"{describe(candidates)}: pick one with cpt.id=<id> or its cpt.* keys"
        )
    return None


def _value(text: str) -> Any:
    """A command-line value as Hydra reads it (``1e-3`` is a number there, not in YAML 1.1)."""
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _agrees(variant: Variant, given: dict[str, Any]) -> bool:
    recorded = variant.view.get("cpt") or {}
    return all(k not in recorded or recorded[k] == v for k, v in given.items())


def _mismatch(cfg: DictConfig, variant: Variant) -> str:
    wanted = CptSpec.from_config(cfg).config_view()
    keys = [k for k in MATCH_KEYS if variant.view.get(k) != wanted.get(k)]
    return ", ".join(f"{k}: {_short(variant.view.get(k))} there" for k in keys)


def _short(value: object) -> str:
    if isinstance(value, dict) and "name" in value:
        return f"{value['name']}" + (
            f" ({value['name_or_path']})" if value.get("name_or_path") else ""
        )
    return str(value)
