"""The shared top-level keys are declared once (cmmerge/config/keys.py): their defaults reach
every command's config, their types and allowed values reach the specs and the override check,
and no YAML file or spec declares them again."""

from __future__ import annotations

import pytest
import yaml
from conftest import compose
from omegaconf import OmegaConf

from cmmerge.config.keys import KEYS, defaults
from cmmerge.config.overrides import check_overrides
from cmmerge.config.specs import FinetuneSpec, MergeSpec, setting
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
    "stage", ["cpt", "merge", "finetune", "graft", "prompt", "pipeline", "sweep"]
)
def test_every_command_composes_the_declared_defaults(stage):
    cfg = compose(stage)
    for key in KEYS.values():
        want = key.default
        if stage == "graft" and key.name == "init":
            want = "graft"
        got = OmegaConf.select(cfg, key.name)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == want, key.name
    assert set(defaults()) <= set(cfg)


def test_no_yaml_file_declares_a_shared_key_again():
    """Only the commands' own overrides (graft's init) and experiments set a shared key in YAML."""
    common = yaml.safe_load((CONFIG_DIR / "common.yaml").read_text())
    for name in KEYS:
        node = common
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node is None, f"{name} is declared in common.yaml again"
    assert "keys" in common["defaults"]


def test_specs_take_type_and_choices_from_the_declaration():
    fields = {
        f.name: f.metadata["setting"]
        for f in MergeSpec.__dataclass_fields__.values()
        if "setting" in f.metadata
    }
    assert fields["dtype"].choices == KEYS["dtype"].choices and fields["dtype"].kind is str
    seed = FinetuneSpec.__dataclass_fields__["seed"].metadata["setting"]
    assert seed.kind is int
    with pytest.raises(TypeError, match="declared in cmmerge.config.keys"):
        setting(0, "seed", kind=int)


def test_wrong_values_of_shared_keys_are_refused_in_one_line():
    with pytest.raises(CmmergeError, match="seed=abc: seed takes a number"):
        check_overrides("finetune", ["seed=abc"])
    with pytest.raises(CmmergeError, match="force=3: force takes true or false"):
        check_overrides("merge", ["force=3"])
    with pytest.raises(CmmergeError, match="dtype=float64: choose one of float32"):
        MergeSpec.from_config(compose("merge", ["dtype=float64"]))
