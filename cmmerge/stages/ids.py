"""Names of stage folders in a run directory (DESIGN section 3) and of the paper's arms.

Each name is derived from the stage's spec: the settings that change its outputs. The readable
part names what is usually varied (``ties-l0.5-d0.2``, ``cpt@en-hi-sentiment-en-hi-s0``); every
other setting that differs from its preset (the method's file, the ``train`` group's presets)
adds a short hash of the differences, so two variants never share a folder. Stages made from a
CPT carry its id after ``@``: several CPT variants (corpus, duration) live in one run directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import NOT_OUTPUT_SETTINGS
from cmmerge.merging.methods import get_method, resolve_params
from cmmerge.settings import CONFIG_DIR, merge_scale, plain, run_dir

# Settings left out of the hash: those that only change how fast or how verbosely a stage runs
# (shared with the fingerprint), and the arms' task lists, which the readable part names.
_NOT_OUTPUT = NOT_OUTPUT_SETTINGS | {"sequential", "joint"}


def _num(x: float) -> str:
    return f"{float(x):g}"


def short_hash(obj: Any) -> str:
    """Six hex digits identifying ``obj`` (a plain, JSON-able value)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


@cache
def _presets(section: str) -> dict[str, dict]:
    """``{preset: settings}`` of a section (``cpt``, ``finetune``) in every ``train`` preset."""
    out = {}
    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict) and isinstance(node.get(section), dict):
            out[path.stem] = node[section]
    return out


def _differences(settings: dict, section: str) -> dict:
    """The settings that differ from the closest ``train`` preset (with that preset's name)."""
    settings = {k: v for k, v in settings.items() if k not in _NOT_OUTPUT}
    best: dict | None = None
    for name, preset in _presets(section).items():
        diff = {k: v for k, v in settings.items() if preset.get(k, object()) != v}
        if best is None or len(diff) < len(best) - 1:
            best = {"preset": name, **diff}
    if best is None or len(best) == 1:
        return {}
    return best


def _suffix(differences: dict) -> str:
    return f"-{short_hash(differences)}" if differences else ""


def method_name(cfg: DictConfig) -> str:
    """Canonical merge method name (``tv`` -> ``task_arithmetic``)."""
    return get_method(str(cfg.method.name)).name


def source_names(cfg: DictConfig) -> list[str]:
    """What a run-directory merge combines: ``cpt`` (default) and/or task names (tau of the
    model fine-tuned on that task from the base)."""
    return [str(s) for s in (cfg.get("sources") or ["cpt"])]


def cpt_id(cfg: DictConfig) -> str:
    """``<corpus>[-lora][-<hash>]``: the corpus, LoRA, and a hash of every other CPT setting
    that differs from its ``train`` preset (duration, learning rate, seed...)."""
    peft = plain(cfg.get("peft")) or {"name": "none"}
    diff = _differences(plain(cfg.cpt), "cpt")
    if peft.get("name", "none") != "none":
        diff_peft = {k: v for k, v in peft.items() if k != "targets_by_family"}
        if diff_peft != _default_lora():
            diff = {**diff, "peft": diff_peft}
    lora = "-" + str(peft["name"]) if peft.get("name", "none") != "none" else ""
    return f"{cfg.corpus.name}{lora}{_suffix(diff)}"


@cache
def _default_lora() -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "peft" / "lora.yaml"))
    return {k: v for k, v in node.items() if k != "targets_by_family"}


def merge_spec(cfg: DictConfig) -> dict:
    """Every setting that changes a run-directory merge's tensors."""
    method = method_name(cfg)
    m = cfg.method
    params = resolve_params(
        method,
        density=cfg.get("density"),
        sign=m.get("sign"),
        normalize=m.get("normalize"),
        trim_scope=m.get("trim_scope"),
        seed=m.get("seed"),
    )
    return {
        "method": method,
        "lambda": merge_scale(cfg),
        "params": params,
        "sources": source_names(cfg),
        "weights": None if cfg.get("weights") is None else [float(w) for w in cfg.weights],
        "dtype": None if cfg.get("dtype") is None else str(cfg.dtype),
        "cpt": cpt_id(cfg),
    }


def merge_id(cfg: DictConfig) -> str:
    """``<method>-l<lambda>[-d<density>][-src_<sources>[_s<seed>]][-w<weights>][-<hash>]@<cpt-id>``.

    A source that is a task (tau of the base fine-tuned on it, :func:`source_finetune_id`)
    comes from a seeded fine-tune: the seed follows the sources, and training settings of that
    fine-tune other than the preset's join the hash, so merges of different sources never
    share a folder."""
    spec = merge_spec(cfg)
    out = f"{spec['method']}-l{_num(spec['lambda'])}"
    params = dict(spec["params"])
    if "density" in params:
        out += f"-d{_num(params.pop('density'))}"
    tasks = [s for s in spec["sources"] if s != "cpt"]
    if spec["sources"] != ["cpt"]:
        out += "-src_" + "+".join(spec["sources"])
        if tasks:  # tau of a task comes from a seeded fine-tune: one merge per source seed
            out += f"_s{int(cfg.seed)}"
    if spec["weights"] is not None and not cfg.get("models") and not cfg.get("task_vectors"):
        out += "-w" + "+".join(_num(w) for w in spec["weights"])
    defaults = resolve_params(spec["method"], sign="sum", trim_scope="tensor", seed=0)
    diff = {k: v for k, v in params.items() if defaults.get(k) != v}
    if spec["dtype"] is not None:
        diff["dtype"] = spec["dtype"]
    # the sources' training settings (the seed is named above): the same for every seed
    sources = [re.sub(r"-s\d+$", "", source_finetune_id(cfg, t)) for t in tasks]
    if sources != [f"base-{t}" for t in tasks]:  # settings other than the preset's
        diff["source_finetunes"] = sources
    return f"{out}{_suffix(diff)}@{spec['cpt']}"


GRAFT = "graft"  # init=graft: tau_cpt added to a fine-tuned model (``cmmerge graft``)
_SEED_SUFFIX = re.compile(r"-s\d+$")


def onto_task(cfg: DictConfig) -> str:
    """The task whose fine-tune (from the base) a graft adds tau_cpt to (``onto``)."""
    onto = cfg.get("onto")
    if not onto:
        raise CmmergeError("init=graft needs onto=TASK: the task whose fine-tune gets tau_cpt")
    return str(onto)


def is_graft_id(name: str) -> bool:
    """Whether a ``finetune/`` folder name is a graft's: its CPT id (after ``@``, which never
    holds ``+``) is followed by ``+``, where a fine-tune's is followed by ``-<task>``."""
    return re.search(r"@[^@+]*\+", name) is not None


def graft_source_id(cfg: DictConfig) -> str:
    """The fine-tune a graft adds tau_cpt to: the base fine-tuned on ``onto`` with this
    config's training settings and seed (as a multi-source merge's source)."""
    return source_finetune_id(cfg, onto_task(cfg))


def init_id(cfg: DictConfig) -> str:
    """What fine-tuning starts from: base, ``cpt@<cpt-id>``, a merge id, or a folder's name;
    for a graft ``<merge-id>+<fine-tune id without its seed>`` (tau_cpt at lambda added to the
    base fine-tuned on ``onto``)."""
    init = str(cfg.init)
    if init == "base":
        return init
    if init == GRAFT:
        return f"{merge_id(cfg)}+{_SEED_SUFFIX.sub('', graft_source_id(cfg))}"
    if init == "cpt":
        return f"cpt@{cpt_id(cfg)}"
    if init == "merged":
        return merge_id(cfg)
    return "dir_" + re.sub(r"[^A-Za-z0-9_.]+", "_", Path(init).name or "model")


def _task_list(cfg: DictConfig, key: str) -> list[str]:
    return [str(t) for t in (cfg.finetune.get(key) or [])]


def finetune_id(cfg: DictConfig) -> str:
    """``<init>-<task>[-seq_<tasks>][-joint_<tasks>][-lora][-<hash>]-s<seed>``; the hash covers
    the training settings (lr, epochs, max_length, class weights...) that differ from the
    ``train`` preset, and LoRA settings other than the defaults.

    A graft (``init=graft``, made by ``cmmerge graft``, not trained) is
    ``<merge-id>+<source fine-tune id without seed>-<task>-s<seed>``, e.g.
    ``task_arithmetic-l0.5@en-hi+base-english-sentiment-en-hi-sentiment-en-hi-s0``: it starts
    with the merge's ``<method>-l<lambda>`` so the report groups its lambdas into one family
    (lambda chosen on validation), and its source's id carries the training settings."""
    if str(cfg.init) == GRAFT:
        return f"{init_id(cfg)}-{cfg.task.name}-s{int(cfg.seed)}"
    parts = [init_id(cfg), str(cfg.task.name)]
    if _task_list(cfg, "sequential"):
        parts.append("seq_" + "+".join(_task_list(cfg, "sequential")))
    if _task_list(cfg, "joint"):
        parts.append("joint_" + "+".join(_task_list(cfg, "joint")))
    diff = _differences(plain(cfg.finetune), "finetune")
    peft = plain(cfg.get("peft")) or {"name": "none"}
    if peft.get("name", "none") != "none":
        parts.append(str(peft["name"]))
        diff_peft = {k: v for k, v in peft.items() if k != "targets_by_family"}
        if diff_peft != _default_lora():
            diff = {**diff, "peft": diff_peft}
    return "-".join(parts) + _suffix(diff) + f"-s{int(cfg.seed)}"


def source_finetune_id(cfg: DictConfig, task: str) -> str:
    """The fine-tune whose task vector a multi-source merge takes for ``task``: the base
    fine-tuned on it with this config's training settings and seed."""
    other = cfg.copy()
    from omegaconf import open_dict

    with open_dict(other):
        other.init = "base"
        other.task = {"name": task}
        other.finetune.sequential = []
        other.finetune.joint = []
    return finetune_id(other)


def is_monolingual(task: DictConfig | dict) -> bool:
    """A task in one language (``language_pair: en``), e.g. English labels for a code-mixed
    task: its arms are named apart from those trained on code-mixed labels."""
    pair = str(task.get("language_pair") or "")
    return bool(pair) and "-" not in pair


def _language_name(task: DictConfig | dict) -> str:
    pair = str(task.get("language_pair") or "")
    return {"en": "English", "hi": "Hindi", "es": "Spanish"}.get(pair, pair)


def graft_arm(cfg: DictConfig) -> str:
    """``English FT + τ_cpt (lambda=0.5)`` (``(TIES, lambda=..)`` for other methods)."""
    from cmmerge.settings import load_group_config

    onto = onto_task(cfg)
    task = cfg.task if str(cfg.task.name) == onto else load_group_config("task", onto)
    source = f"{_language_name(task)} FT" if is_monolingual(task) else f"FT on {onto}"
    method = method_name(cfg)
    short = "" if method == "task_arithmetic" else f"{_SHORT.get(method, method)}, "
    return f"{source} + τ_cpt ({short}lambda={_num(merge_scale(cfg))})"


_SHORT = {"task_arithmetic": "TV", "ties": "TIES"}


def arm_name(cfg: DictConfig) -> str:
    """The paper's name of the arm this fine-tuning run belongs to; arms trained on a
    monolingual task (English labels) say so: ``Full FT (English labels)``."""
    lora = " (LoRA)" if str(cfg.get("peft", {}).get("name", "none")) == "lora" else ""
    if str(cfg.init) == GRAFT:
        return graft_arm(cfg) + lora
    if _task_list(cfg, "sequential"):
        return f"Sequential FT ({' -> '.join(_task_list(cfg, 'sequential'))} first){lora}"
    if _task_list(cfg, "joint"):
        return f"Joint FT (+{'+'.join(_task_list(cfg, 'joint'))}){lora}"
    return _init_arm(cfg) + lora


def _init_arm(cfg: DictConfig) -> str:
    init = str(cfg.init)
    labels = f"{_language_name(cfg.task)} labels" if is_monolingual(cfg.task) else ""
    if init == "merged":
        short = _SHORT.get(method_name(cfg), method_name(cfg))
        sources = "" if source_names(cfg) == ["cpt"] else f"{'+'.join(source_names(cfg))}, "
        labels = f"{labels}, " if labels else ""
        return f"{short}->FT ({sources}{labels}lambda={_num(merge_scale(cfg))})"
    name = {"base": "Full FT", "cpt": "CPT->FT"}.get(init, f"FT from {init}")
    return f"{name} ({labels})" if labels else name


def stage_dirs(cfg: DictConfig) -> dict[str, Path]:
    root = run_dir(cfg)
    graft = {}
    if str(cfg.get("init")) == GRAFT:  # the fine-tune a graft adds tau_cpt to
        graft["onto"] = root / "finetune" / graft_source_id(cfg)
    return {
        **graft,
        "run": root,
        "data": root / "data",
        "cpt": root / "cpt" / cpt_id(cfg),
        "extract": root / "extract" / cpt_id(cfg),
        "merge": root / "merge" / merge_id(cfg),
        "finetune": root / "finetune" / finetune_id(cfg),
        "evaluate": root / "evaluate" / finetune_id(cfg),
        "sweep": root / "sweep",
        "report": root / "report",
    }


def cli_hint(cfg: DictConfig, stage: str, *extra: str) -> str:
    """The command that makes a missing upstream stage."""
    parts = ["cmmerge", stage, f"run.root={cfg.run.root}", f"run.name={cfg.run.name}", *extra]
    return " ".join(parts)
