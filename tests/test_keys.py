"""The top-level keys are declared once (cmmerge/config/keys.py): their defaults reach the
commands that have them, their types and allowed values reach the specs and the override check,
and no command's YAML or spec declares them again."""

from __future__ import annotations

import pytest
import yaml
from conftest import compose
from omegaconf import OmegaConf

from cmmerge.config.keys import COMMANDS_WITH_KEYS, KEYS, defaults
from cmmerge.config.overrides import check_overrides
from cmmerge.config.specs import FinetuneSpec, MergeSpec, PromptSpec, setting
from cmmerge.errors import CmmergeError
from cmmerge.presets import CONFIG_DIR


def test_each_default_fits_its_own_declaration():
    for key in KEYS.values():
        if key.default is None:
            continue
        if key.kind is not None:
            assert isinstance(key.default, key.kind), key.name
        if key.choices is not None:
            assert key.default in key.choices, key.name
        if key.low is not None:
            assert key.default >= key.low, key.name


@pytest.mark.parametrize(
    "stage", ["cpt", "merge", "finetune", "graft", "prompt", "report", "pipeline", "sweep"]
)
def test_every_command_composes_the_declared_defaults(stage):
    """Each command has the shared keys and its own, at their declared defaults, and no other
    command's own keys."""
    cfg = compose(stage)
    for key in KEYS.values():
        got = OmegaConf.select(cfg, key.name)
        if key.commands and stage not in key.commands:
            assert got is None and key.name.split(".")[0] not in cfg, key.name
            continue
        want = "graft" if (stage, key.name) == ("graft", "init") else key.default
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == want, key.name
    assert set(defaults()) <= set(cfg)


def test_no_yaml_file_declares_a_key_again():
    """A command's YAML lists the declared keys' nodes and sets none of them itself (graft's
    ``init: graft`` is its choice of value, not a declaration); experiments may set any."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        for name in KEYS:
            node = config
            for part in name.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if (path.stem, name) != ("graft", "init"):
                assert node is None, f"{name} is declared in {path.name} again"
        if path.stem == "common":
            assert "keys" in config["defaults"]
        elif path.stem in COMMANDS_WITH_KEYS:
            assert f"keys_{path.stem}" in config["defaults"], path.name


def test_specs_take_type_and_choices_from_the_declaration():
    fields = {
        f.name: f.metadata["setting"]
        for f in MergeSpec.__dataclass_fields__.values()
        if "setting" in f.metadata
    }
    assert fields["dtype"].choices == KEYS["dtype"].choices and fields["dtype"].kind is str
    assert FinetuneSpec.__dataclass_fields__["seed"].metadata["setting"].kind is int
    shots = PromptSpec.__dataclass_fields__["shots"].metadata["setting"]
    assert (shots.kind, shots.low) == (int, 0)
    with pytest.raises(TypeError, match="declared in cmmerge.config.keys"):
        setting(0, "seed", kind=int)


def test_wrong_values_are_refused_in_one_line():
    with pytest.raises(CmmergeError, match="seed=abc: seed takes a whole number, e.g. seed=0"):
        check_overrides("finetune", ["seed=abc"])
    with pytest.raises(CmmergeError, match="force=3: force takes true or false"):
        check_overrides("merge", ["force=3"])
    with pytest.raises(CmmergeError, match="keep_models=2: keep_models takes true or false"):
        check_overrides("pipeline", ["keep_models=2"])
    with pytest.raises(CmmergeError, match="dtype=float64: choose one of float32"):
        MergeSpec.from_config(compose("merge", ["dtype=float64"]))
    with pytest.raises(CmmergeError, match="shots=-1: must be >= 0"):
        PromptSpec.from_config(compose("prompt", ["model=tiny-llama", "shots=-1"]))
