"""`cmmerge status`: every stage folder of a run with its state (finished, stale, running,
failed, interrupted, incomplete), the stages this config needs that are missing, and the
command that makes or redoes each."""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.config.chain import chain as upstream_chain
from cmmerge.config.chain import command_for
from cmmerge.config.cpt_variants import differing, finished_variants, matching
from cmmerge.config.ids import is_graft_id, stage_dirs
from cmmerge.config.specs import GRAFT, CptSpec
from cmmerge.config.values import hydra_overrides, run_dir
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import MANIFEST, read_json, read_manifest
from cmmerge.reporting.tables import markdown_table
from cmmerge.stages.registry import stage_folders
from cmmerge.stages.runner import STARTED, failure_file


def _stage_folders(root: Path) -> list[Path]:
    """Stage folders under ``root`` (in the top folders of the stage registry): those with a
    manifest, and those named by a lock, a partial folder or a failure record beside them."""
    found: set[Path] = set()
    tops = stage_folders()
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if not rel or len(rel) > 4:
            continue
        name = path.name
        if name == MANIFEST and path.parent != root:
            found.add(path.parent)
        elif name.startswith(".partial-") and path.is_dir():
            found.add(path.parent / name.removeprefix(".partial-"))
        elif name.startswith(".") and name.endswith(".failed.json"):
            found.add(path.parent / name[1 : -len(".failed.json")])
        elif name.startswith(".") and name.endswith(".lock") and path.parent != root:
            found.add(path.parent / name[1 : -len(".lock")])
    found = {p for p in found if p.relative_to(root).parts[0] in tops}
    # a stage's own sub-folders (model/, checkpoints/, a partial folder's contents) are not stages
    stages = {p for p in found if not any(part.startswith(".partial-") for part in p.parts)}
    return sorted(p for p in stages if not any(q != p and q in p.parents for q in stages))


def stage_state(stage_dir: Path) -> tuple[str, str]:
    """(state, detail) of one stage folder."""
    if transaction.is_locked(stage_dir):
        return "running", "a process holds its lock"
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        problem = transaction.problem(stage_dir, manifest, content=False)
        if problem is not None:
            return "incomplete", problem
        changed = transaction.changed(stage_dir, manifest)
        if changed is not None:
            return "stale", changed
        stale = transaction.stale_inputs(manifest)
        if stale:
            return "stale", f"{Path(stale[0]).name} changed since it was made"
        return "finished", f"{manifest.get('wall_time_s', '?')} s"
    if failure_file(stage_dir).exists():
        try:
            return "failed", str(read_json(failure_file(stage_dir)).get("error", ""))
        except (OSError, ValueError):
            return "failed", "see its log"
    if transaction.partial_dir(stage_dir).exists():
        return "interrupted", "a partial run is left; the same command resumes or restarts it"
    return "missing", ""


def _command(stage_dir: Path, root: Path, fallback: list[str]) -> str:
    for record in (failure_file(stage_dir), transaction.partial_dir(stage_dir) / STARTED):
        try:  # the command recorded when it failed, or when the interrupted run started
            command = read_json(record).get("command") if record.is_file() else None
        except (OSError, ValueError, AttributeError):
            command = None
        if isinstance(command, str) and command:
            return command
    manifest = read_manifest(stage_dir)
    stage = (manifest or {}).get("stage") or stage_dir.relative_to(root).parts[0]
    if stage == "finetune" and is_graft_id(stage_dir.name):  # a failed or interrupted graft
        stage = "graft"
    overrides = (manifest or {}).get("overrides") or fallback
    if failure_file(stage_dir).exists():
        try:
            overrides = read_json(failure_file(stage_dir)).get("overrides") or overrides
        except (OSError, ValueError):
            pass
    return " ".join(["cmmerge", str(stage), *map(shlex.quote, overrides)])


def _expected(cfg: DictConfig) -> dict[str, Path]:
    """The stages the given config's fine-tuning chain needs (a graft's: cpt, extract, the
    fine-tune on ``onto``, the graft, evaluate)."""
    dirs = stage_dirs(cfg)
    init = str(cfg.init)
    if init == GRAFT:
        found = {key: dirs[key] for _, _, key in upstream_chain(cfg, "evaluate")}
        return {**found, "evaluate": dirs["evaluate"]}
    chain = ["finetune", "evaluate"]
    if init in ("cpt", "merged"):
        chain = ["cpt", *(["extract", "merge"] if init == "merged" else []), *chain]
    return {name: dirs[name] for name in chain}


def run(cfg: DictConfig) -> dict:
    root = run_dir(cfg)
    if not root.is_dir():
        raise CmmergeError(f"run directory {root} does not exist (run.name={cfg.run.name})")
    given = [o for o in hydra_overrides() if not o.startswith(("force=", "debug="))]
    rows = []
    seen = set()
    for stage_dir in _stage_folders(root):
        state, detail = stage_state(stage_dir)
        rows.append(
            {
                "stage": stage_dir.relative_to(root).as_posix(),
                "state": state,
                "detail": detail,
                "command": "" if state == "finished" else _command(stage_dir, root, given),
            }
        )
        seen.add(stage_dir)
    evaluate_dirs = [stage_dirs(cfg)["evaluate"] / str(t) for t in _eval_tasks(cfg)]
    commands = {key: command for _, command, key in upstream_chain(cfg, "evaluate")}
    for name, stage_dir in _expected(cfg).items():
        for folder in evaluate_dirs if name == "evaluate" else [stage_dir]:
            if folder not in seen and not (folder / MANIFEST).exists():
                keys = ["init=graft"] if name == "evaluate" and str(cfg.init) == GRAFT else []
                command = commands.get(name) or command_for(cfg, name, *keys)
                rows.append(
                    {
                        "stage": folder.relative_to(root).as_posix(),
                        "state": "missing",
                        "detail": "needed by this config",
                        "command": command,
                    }
                )
    table = markdown_table(rows, ["stage", "state", "detail", "command"]) if rows else "empty\n"
    found = variant_rows(root, cfg)
    listed = ""
    if found:
        listed = (
            "\n## Fine-tune variants\n\nFine-tunes of one arm made with different settings (the "
            "ones in which they differ); `this config`: made with the given configuration's.\n\n"
            + markdown_table(found, ["arm", "task", "seeds", "this config"])
        )
    print(f"# cmmerge status: {root}\n\n{table}{cpt_variants_section(cfg)}{listed}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {
        "stage": "status",
        "rows": rows,
        "counts": counts,
        "variants": found,
        "skipped": False,
    }


def variant_rows(root: Path, cfg: DictConfig) -> list[dict]:
    """One row per finished arm of the run that has variants (``Full FT [epochs=2]``): its
    name with the settings it differs in, task, seeds, and whether ``cfg`` makes it."""
    from cmmerge.config.specs import configured
    from cmmerge.reporting.study import collect, group_arms
    from cmmerge.reporting.variants import mark_configured

    arms = group_arms(collect(root, predictions=False))
    if not any(a.tag for a in arms):
        return []
    mark_configured(arms, configured(cfg), hide=False)
    return [
        {
            "arm": a.arm,
            "task": a.task,
            "seeds": " ".join(map(str, a.seeds)),
            "this config": "yes" if a.configured else "",
        }
        for a in sorted(arms, key=lambda a: (a.task, a.arm))
        if a.tag
    ]


def cpt_variants_section(cfg: DictConfig) -> str:
    """The run's CPT variants for this config's model and corpus, and the one it resolves to."""
    variants = matching(cfg, finished_variants(run_dir(cfg)))
    if not variants:
        return ""
    configured = CptSpec.from_config(cfg).folder_id
    rows = [
        {
            "CPT variant": f"cpt/{folder_id}",
            "settings that differ": ", ".join(f"{k}={v}" for k, v in diff.items()) or "-",
            "pick with": f"cpt.id={folder_id}",
            "this config": "uses it" if folder_id == configured else "",
        }
        for folder_id, diff in differing(variants).items()
    ]
    if any(row["this config"] for row in rows):
        verdict = f"this config resolves to cpt/{configured}"
    else:
        verdict = (
            f"this config names cpt/{configured}, which is not made: pick a variant with "
            "cpt.id=<id>"
        )
    columns = ["CPT variant", "settings that differ", "pick with", "this config"]
    return f"\n## CPT variants\n\n{markdown_table(rows, columns)}\n{verdict}\n"


def _eval_tasks(cfg: DictConfig) -> list[str]:
    return [str(t) for t in (cfg.get("eval_tasks") or [cfg.task.name])]
