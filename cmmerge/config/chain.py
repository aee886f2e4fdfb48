"""The upstream chain of a stage, named whole when it is missing: `finetune init=merged` on a
fresh run says it needs cpt, extract and merge, with the commands, instead of one at a time.

A graft (``cmmerge graft``: tau_cpt added to the base fine-tuned on ``onto``) needs cpt, extract
and that fine-tune; ``evaluate init=graft`` needs the graft too."""

from __future__ import annotations

from omegaconf import DictConfig

from cmmerge.config.ids import cli_hint, stage_dirs
from cmmerge.config.specs import GRAFT, onto_task, source_names
from cmmerge.config.values import hydra_overrides
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.merging.methods import get_method


def _merge_keys(cfg: DictConfig) -> list[str]:
    keys = [f"method={cfg.method.name}", f"lambda={cfg['lambda']}"]
    if cfg.get("density") is not None and "density" in get_method(str(cfg.method.name)).params:
        keys.append(f"density={cfg.density}")
    return keys


def command_for(cfg: DictConfig, stage: str, *keys: str) -> str:
    """The command that makes ``stage``: the user's own overrides (so the folder it makes is
    the one this config reads), with ``keys`` replacing theirs."""
    given = [o for o in hydra_overrides() if not o.startswith(("force=", "debug=", "init="))]
    if not given:
        return cli_hint(cfg, stage, *keys)
    names = {k.split("=", 1)[0] for k in keys}
    kept = [o for o in given if o.split("=", 1)[0] not in names]
    return " ".join(["cmmerge", stage, *kept, *keys])


def upstream(cfg: DictConfig, stage: str) -> list[tuple[str, str]]:
    """``(stage, command)`` of every stage ``stage`` needs in this run directory, in order."""
    return [(name, command) for name, command, _ in chain(cfg, stage)]


def chain(cfg: DictConfig, stage: str) -> list[tuple[str, str, str]]:
    """``(stage, command, key of its folder in stage_dirs)`` of every stage ``stage`` needs."""
    init = str(cfg.get("init", "base"))
    if stage == "graft":
        keys = [f"task={onto_task(cfg)}", f"seed={cfg.seed}"]
        onto = ("finetune", command_for(cfg, "finetune", "init=base", *keys), "onto")
        return [*chain(cfg, "extract"), ("extract", command_for(cfg, "extract"), "extract"), onto]
    if stage == "evaluate" and init == GRAFT:
        make = command_for(cfg, "graft", f"onto={onto_task(cfg)}", *_merge_keys(cfg))
        return [*chain(cfg, "graft"), ("graft", make, "finetune")]
    return [(name, command, name) for name, command in _upstream(cfg, stage)]


def _upstream(cfg: DictConfig, stage: str) -> list[tuple[str, str]]:
    cpt = ("cpt", command_for(cfg, "cpt"))
    init = str(cfg.get("init", "base"))
    if stage == "extract":
        return [cpt]
    if stage == "merge":
        return (
            [cpt, ("extract", command_for(cfg, "extract"))] if source_names(cfg) == ["cpt"] else []
        )
    if stage == "finetune":
        if init == "cpt":
            return [cpt]
        if init == "merged" and source_names(cfg) == ["cpt"]:
            return [
                *_upstream(cfg, "merge"),
                ("merge", command_for(cfg, "merge", *_merge_keys(cfg))),
            ]
        return []
    if stage == "evaluate":
        keys = [f"init={init}", f"task={cfg.task.name}", f"seed={cfg.seed}"]
        if init == "merged":
            keys += _merge_keys(cfg)
        return [*_upstream(cfg, "finetune"), ("finetune", command_for(cfg, "finetune", *keys))]
    return []


def require_upstream(cfg: DictConfig, stage: str) -> None:
    """Raise one CmmergeError naming every missing stage of ``stage``'s chain (none: return)."""
    if stage == "finetune" and str(cfg.get("init")) == GRAFT:
        raise CmmergeError(
            "init=graft is not fine-tuned: `cmmerge graft onto=TASK lambda=...` makes it "
            "(tau_cpt added to the base fine-tuned on TASK); evaluate it with `cmmerge evaluate "
            "init=graft ...`"
        )
    dirs = stage_dirs(cfg)
    missing = [(name, hint) for name, hint, key in chain(cfg, stage) if _unfinished(dirs[key])]
    if not missing:
        return
    names = ", ".join(name for name, _ in missing)
    commands = " && ".join(f"`{hint}`" for _, hint in missing)
    others = ""
    if any(name == "cpt" for name, _ in missing):
        from cmmerge.config.cpt_variants import finished_variants

        made = [v.folder_id for v in finished_variants(dirs["run"])]
        if made:
            others = (
                f" (the CPTs made there, {', '.join(made)}, were made for another model, corpus, "
                "peft or data: `cmmerge status` compares them)"
            )
    raise CmmergeError(
        f"{stage} needs {names}, not made yet in {dirs['run']}{others}: run {commands}"
    )


def _unfinished(stage_dir) -> bool:
    return transaction.finished_manifest(stage_dir) is None
