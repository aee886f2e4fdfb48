"""The stage specs (:mod:`cmmerge.config.specs`): the folder, the fingerprint and the manifest's
config all come from one frozen spec, so a setting that changes a stage's outputs changes its
folder or its fingerprint; the folder names are the ones finished run directories have."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import compose

from cmmerge.config import plan
from cmmerge.config.inputs import leakage_tasks, split_seed
from cmmerge.config.specs import (
    CptSpec,
    DataSpec,
    EvaluateSpec,
    ExtractSpec,
    FinetuneSpec,
    FrozenMap,
    GraftSpec,
    MergeSpec,
    PromptSpec,
    StageSpec,
    setting,
    shard_bytes,
    spec_for,
    thaw,
)
from cmmerge.config.values import data_root, merge_scale, task_config
from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import DEFAULT_MAX_SHARD_SIZE
from cmmerge.io.manifest import NOT_OUTPUT_SETTINGS, fingerprint, output_view
from cmmerge.presets import CONFIG_DIR, plain

IDS = Path(__file__).parent / "fixtures" / "stage_ids.json"
EN = "english-sentiment-en-hi"

# (stage, overrides): defaults, a changed lr, sign / trim_scope / dtype, LoRA, init=DIR, ...
CASES = [
    ("cpt", []),
    ("cpt", ["cpt.lr=1e-3", "peft=lora"]),
    ("extract", ["dtype=bfloat16"]),
    ("merge", []),
    ("merge", ["method=ties", "method.sign=count", "method.trim_scope=model", "dtype=float16"]),
    ("merge", [f"sources=[cpt,{EN}]", "weights=[1.0,0.5]", "finetune.lr=1e-4", "seed=2"]),
    ("finetune", []),
    ("finetune", ["finetune.lr=1e-4"]),
    ("finetune", ["peft=lora", "init=cpt"]),
    ("finetune", ["init=merged", "method=ties", "method.sign=count"]),
    ("finetune", ["init=/tmp/some/model-dir", "finetune.epochs=2"]),
    ("graft", [f"onto={EN}", "lambda=0.7", "dtype=bfloat16"]),
    ("evaluate", ["finetune.lr=1e-4"]),
    ("evaluate", ["init=graft", f"onto={EN}"]),
    ("prompt", ["model=tiny-llama", "shots=2"]),
    ("data", []),
]

# what the stage resolves when it runs (values only the stage knows)
RESOLVED = {
    "source_paths": ["/x/extract/task_vector.safetensors"],
    "source_weights": [1.0],
    "init_dir": "/x/model",
    "labels": ["negative", "neutral", "positive"],
    "dtype": "float32",
}


def _cfg(stage: str, overrides: list[str]):
    name = "finetune" if stage == "graft" else stage
    cfg = compose(name, ["run.root=/runs", *overrides])
    return plan.with_values(cfg, init="graft") if stage == "graft" else cfg


def _spec(stage: str, overrides: list[str]) -> StageSpec:
    spec = spec_for(_cfg(stage, overrides), "graft" if stage == "graft" else stage)
    return spec.resolve(**{k: RESOLVED[k] for k in spec.resolved_fields()})


def _case_id(case) -> str:
    return f"{case[0]}:{' '.join(case[1]) or 'defaults'}"


# --- the views the stages built before the specs (fingerprints of finished stages) --------------


def _legacy_view(stage: str, cfg) -> dict:
    """The config view each stage assembled itself before the specs existed."""
    root, seed = str(data_root(cfg)), int(cfg.seed)
    if stage == "cpt":
        return {
            **{k: plain(cfg.get(k)) for k in ("model", "corpus", "cpt")},
            "data_root": root,  # the leakage list left the view for the corpus's hash (an input)
            "split_seed": split_seed(cfg),
            "seed": int(cfg.cpt.seed),
            "peft": plain(cfg.get("peft")),
        }
    if stage == "extract":
        paths = [str(Path(p).expanduser()) for p in cfg.get("task_vectors") or []]
        return {"model": plain(cfg.model), "dtype": cfg.get("dtype"), "compare_with": paths}
    if stage == "merge":
        return {
            "method": MergeSpec.from_config(cfg).method,
            "lambda": merge_scale(cfg),
            "weights": RESOLVED["source_weights"],
            "params": dict(MergeSpec.from_config(cfg).params),
            "dtype": str(cfg.dtype) if cfg.get("dtype") else "float32",
            "max_shard_size": shard_bytes(cfg.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE),
            "allow_nonfinite": bool(cfg.get("allow_nonfinite")),
            "sources": RESOLVED["source_paths"],
        }
    common = {"data_root": root, "split_seed": split_seed(cfg), "seed": seed}
    if stage == "finetune":
        return {
            "task": plain(cfg.task),
            "finetune": plain(cfg.finetune),
            "init": str(cfg.init),
            "init_dir": RESOLVED["init_dir"],
            "peft": plain(cfg.get("peft")),
            "labels": RESOLVED["labels"],
            "labels_inferred": cfg.task.get("labels") is None,
            **common,
        }
    if stage == "graft":
        return {
            "onto": str(cfg.onto),
            "method": MergeSpec.from_config(cfg).method,
            "lambda": merge_scale(cfg),
            "params": dict(MergeSpec.from_config(cfg).params),
            "dtype": str(cfg.dtype) if cfg.get("dtype") else "float32",
            "task": plain(cfg.task),
            "labels": RESOLVED["labels"],
            "evaluate": plain(cfg.evaluate),
            **common,
        }
    if stage == "evaluate":
        task = task_config(cfg, str(cfg.task.name))
        return {
            "task": plain(task),
            "labels": RESOLVED["labels"],
            "evaluate": plain(cfg.evaluate),
            **common,
        }
    if stage == "prompt":
        return {
            "task": plain(cfg.task),
            "prompt": plain(cfg.prompt),
            "normalize": bool(cfg.prompt.normalize),
            "dtype": RESOLVED["dtype"],
            "shots": int(cfg.shots),
            **common,
        }
    assert stage == "data"
    return {
        "task": plain(cfg.task),
        "corpus": plain(cfg.corpus),
        "data": plain(cfg.data),
        "data_root": root,
        "seed": seed,
        "cpt_seed": cfg.cpt.seed,
        "model": plain(cfg.model) if cfg.data.get("token_lengths", True) else None,
        "leakage_tasks": leakage_tasks(cfg),
    }


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_the_view_is_the_one_finished_stages_recorded(case):
    stage, overrides = case
    view = _spec(stage, overrides).config_view()
    legacy = _legacy_view(stage, _cfg(stage, overrides))
    assert view == legacy
    assert json.dumps(view, sort_keys=True) == json.dumps(legacy, sort_keys=True)
    assert fingerprint(view, []) == fingerprint(legacy, [])


# --- every output-affecting field names the folder or is fingerprinted --------------------------


def _scalar(value) -> bool:
    return isinstance(value, bool | int | float | str)


def _perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        numbers = value and all(isinstance(v, int | float) for v in value)
        return (*value, 0.25 if numbers else "x")
    raise TypeError(value)


# settings with a format: another valid value
_OTHER = {"method": {"task_arithmetic": "ties"}, "max_shard_size": {"1GB": "500MB"}}


def _variants(spec: StageSpec):
    """``(what, perturbed spec)`` for every scalar or tuple field and every scalar entry of a
    section (less the settings that change no output)."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name in _OTHER:
            other = _OTHER[f.name].get(value, next(iter(_OTHER[f.name])))
            yield f.name, dataclasses.replace(spec, **{f.name: other})
        elif _scalar(value) or (isinstance(value, tuple) and all(map(_scalar, value))):
            yield f.name, dataclasses.replace(spec, **{f.name: _perturb(value)})
        elif isinstance(value, FrozenMap):
            for key, entry in value.items():
                if key in NOT_OUTPUT_SETTINGS or not _scalar(entry):
                    continue
                changed = value.replace(**{key: _perturb(entry)})
                yield f"{f.name}.{key}", dataclasses.replace(spec, **{f.name: changed})


def _identity(spec: StageSpec) -> tuple:
    return spec.folder, spec.fingerprint([])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_field_is_fingerprinted_or_names_the_folder(case):
    spec = _spec(*case)
    view = output_view(spec.config_view())
    values = [json.dumps(v, sort_keys=True) for v in view.values()]
    for f in dataclasses.fields(spec):
        if f.name in spec.not_in_view():
            continue
        value = thaw(getattr(spec, f.name))
        if isinstance(value, dict):  # a section: its output settings all fingerprinted
            value = {k: v for k, v in value.items() if k not in NOT_OUTPUT_SETTINGS}
        named = f.name in view  # under its own name (normalised: dtype, max_shard_size)
        assert named or json.dumps(value, sort_keys=True) in values, f"{f.name} not in the view"
    before = _identity(spec)
    checked = 0
    for what, other in _variants(spec):
        assert _identity(other) != before, f"{type(spec).__name__}.{what} changes nothing"
        checked += 1
    assert checked >= 3


def test_not_output_settings_change_neither_folder_nor_fingerprint():
    for stage in ("cpt", "finetune"):
        spec = _spec(stage, [])
        section = getattr(spec, stage)
        for key in NOT_OUTPUT_SETTINGS & set(section):
            other = dataclasses.replace(spec, **{stage: section.replace(**{key: 12345})})
            assert _identity(other) == _identity(spec), key


def test_multi_source_fields_each_name_the_merge():
    spec = _spec("merge", [f"sources=[cpt,{EN}]", "weights=[1.0,0.5]", "seed=2"])
    assert spec.seed == 2 and spec.weights == (1.0, 0.5) and spec.sources == ("cpt", EN)
    for name in ("seed", "weights", "sources", "source_finetunes"):
        other = dataclasses.replace(spec, **{name: _perturb(getattr(spec, name))})
        assert other.folder_id != spec.folder_id, name
    assert "sources=[cpt,english-sentiment-en-hi]" in spec.cli_hint()
    assert "weights=[1,0.5]" in spec.cli_hint() and "seed=2" in spec.cli_hint()


# --- the names finished run directories have ----------------------------------------------------


def _experiment_ids() -> dict[str, list[str]]:
    out = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        cfg = compose("pipeline", [f"experiment={path.stem}", "run.root=/nonexistent"])
        root = plan.run_dir(cfg)
        out[path.stem] = sorted({f"{s.stage} {s.name(root)}" for s in plan.expand(cfg)})
    return out


def test_folder_names_of_every_experiment_are_unchanged():
    """The folders of every experiment's steps, as named before the specs (run directories
    made then, the long experiments among them, keep their folders)."""
    expected = json.loads(IDS.read_text())
    got = _experiment_ids()
    assert sorted(got) == sorted(expected)
    for name in expected:
        missing = sorted(set(expected[name]) - set(got[name]))[:5]
        extra = sorted(set(got[name]) - set(expected[name]))[:5]
        assert got[name] == expected[name], f"{name}: missing {missing}, new {extra}"


def test_plan_folders_are_the_specs_folders():
    cfg = compose("pipeline", ["experiment=no-labels", "run.root=/nonexistent"])
    for step in plan.expand(cfg):
        if step.stage in ("cpt", "extract", "merge", "finetune", "graft", "prompt"):
            assert spec_for(step.cfg, step.stage).folder == step.folder, step
        elif step.stage == "evaluate":
            spec = EvaluateSpec.from_config(step.cfg, step.eval_task)
            assert spec.folder == step.folder, step


# --- frozen and hashable ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_specs_are_frozen_and_hashable(case):
    spec = _spec(*case)
    again = _spec(*case)
    assert spec == again and hash(spec) == hash(again) and len({spec, again}) == 1
    name = dataclasses.fields(spec)[-1].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, name, None)
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        assert not isinstance(value, dict | list), f"{f.name} is mutable"
        if isinstance(value, FrozenMap):
            with pytest.raises(TypeError):
                value["x"] = 1  # type: ignore[index]


def test_spec_classes_and_hints():
    cfg = compose("finetune", ["run.root=/runs", "init=merged", "method=ties", "density=0.5"])
    ft = spec_for(cfg, "finetune")
    assert isinstance(ft, FinetuneSpec) and isinstance(ft.start, MergeSpec)
    assert ft.cli_hint() == "cmmerge finetune run.root=/runs run.name=default init=merged " + (
        "task=sentiment-en-hi seed=0"
    )
    assert ft.start.cli_hint().startswith("cmmerge merge run.root=/runs run.name=default ")
    assert "method=ties lambda=1 density=0.5" in ft.start.cli_hint()
    assert isinstance(spec_for(compose("cpt", []), "cpt"), CptSpec)
    assert isinstance(spec_for(compose("extract", []), "extract"), ExtractSpec)
    assert isinstance(spec_for(compose("data", []), "data"), DataSpec)
    assert isinstance(spec_for(compose("prompt", ["model=tiny-llama"]), "prompt"), PromptSpec)
    graft = spec_for(plan.with_values(compose("finetune", [f"onto={EN}"]), init="graft"), "graft")
    assert isinstance(graft, GraftSpec) and graft.cli_hint().startswith("cmmerge graft ")
    with pytest.raises(RuntimeError, match="not resolved"):
        FinetuneSpec.from_config(compose("finetune", [])).config_view()


# --- the declarations themselves ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ToySpec(StageSpec):
    """A stage declared only with setting(): what a new stage writes."""

    steps: int = setting(1, "toy.steps", kind=int, hint="toy.steps={}")
    rate: float = setting(0.5, "toy.rate", kind=float, view="lr")
    section: FrozenMap | None = setting(source="toy")
    size: Any = setting(source="toy.size", show=lambda v: (v or 0) * 2)
    upstream: str = setting("", lambda cfg: f"up-{cfg.toy.steps}", view=False)
    found: str | None = setting(resolved=True, hint=lambda v: None)

    STAGE = "toy"

    @property
    def folder_id(self) -> str:
        return f"{self.upstream}-s{self.steps}"


def test_a_spec_is_derived_from_its_declarations():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"run": {"root": "/r", "name": "n"}, "toy": {"steps": "3", "rate": 1, "size": 5}}
    )
    spec = _ToySpec.from_config(cfg)
    assert (spec.steps, spec.rate, spec.upstream) == (3, 1.0, "up-3")  # typed as declared
    assert isinstance(spec.section, FrozenMap) and spec.section["size"] == 5
    assert spec.folder == Path("/r/n/toy/up-3-s3")
    assert spec.resolved_fields() == ("found",)
    assert spec.not_in_view() == {"run_root", "run_name", "upstream"}
    partial = {"steps": 3, "lr": 1.0, "section": {"steps": "3", "rate": 1, "size": 5}, "size": 10}
    assert spec.settings_view() == partial  # the resolved field is left out until resolved
    with pytest.raises(RuntimeError, match="found is not resolved"):
        spec.config_view()
    done = spec.resolve(found="/x")
    assert done.config_view() == {**partial, "found": "/x"}
    assert done.fingerprint([]) != dataclasses.replace(done, rate=2.0).fingerprint([])
    with pytest.raises(TypeError, match="resolves"):
        spec.resolve(steps=4)
    assert spec.cli_hint("seed=1") == "cmmerge toy run.root=/r run.name=n toy.steps=3 seed=1"
    bad = OmegaConf.create({"run": {"root": "/r", "name": "n"}, "toy": {"steps": "three"}})
    with pytest.raises(CmmergeError, match=r"toy.steps=three: expected an integer"):
        _ToySpec.from_config(bad)
