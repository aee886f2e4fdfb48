"""The training sections' keys (cpt.*, finetune.*, evaluate.*) are declared once
(cmmerge/config/sections.py): their defaults are the train group's ``default``, ``train=smoke``
lists only what differs, and a wrong value is refused in one line, from the command line or from
a config file, before anything runs."""

from __future__ import annotations

import pytest
import yaml
from conftest import compose
from omegaconf import OmegaConf
from test_cli import _assert_one_line_error, cmmerge

from cmmerge.config.overrides import check_overrides
from cmmerge.config.sections import SECTION_KEYS, check_sections, defaults
from cmmerge.errors import CmmergeError
from cmmerge.presets import CONFIG_DIR, group_options


def test_each_default_fits_its_own_declaration():
    assert len(SECTION_KEYS) == 40
    for key in SECTION_KEYS.values():
        assert key.problem(key.default) is None, key.name


def test_train_default_is_the_declarations_and_smoke_lists_only_differences():
    assert group_options("train") == ["default", "smoke"]
    real = OmegaConf.to_container(compose("finetune", ["model=xlmr"]))
    assert {s: real[s] for s in ("cpt", "finetune", "evaluate")} == defaults()
    smoke_file = yaml.safe_load((CONFIG_DIR / "train" / "smoke.yaml").read_text())
    assert smoke_file["defaults"] == ["default", "_self_"]
    listed = {f"{s}.{k}" for s in ("cpt", "finetune", "evaluate") for k in smoke_file[s]}
    smoke = compose("finetune", ["model=tiny-xlmr"])
    for name, key in SECTION_KEYS.items():
        value = OmegaConf.select(smoke, name)
        assert (value != key.default) == (name in listed), name  # no value repeated
    assert smoke.cpt.max_steps == 150 and smoke.cpt.seed == 0 and smoke.finetune.epochs == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cpt.max_steps=1.5", "cpt.max_steps=1.5: cpt.max_steps takes a whole number"),
        ("cpt.packing=maybe", "cpt.packing=maybe: cpt.packing takes true or false"),
        ("cpt.head_warmup_lr=fast", "cpt.head_warmup_lr takes a number, e.g."),
        ("finetune.class_weights=foo", "finetune.class_weights=foo: choose one of balanced, none"),
        ("cpt.precision=fp64", "choose one of auto, fp32, bf16, fp16"),
        ("finetune.train_size=0", "finetune.train_size=0: must be >= 1"),
        ("finetune.sequential=hate-en-hi", "takes a list"),  # undeclared type: from the default
        ("evaluate.batch_size=big", "evaluate.batch_size takes a whole number, e.g. "),
    ],
)
def test_a_wrong_value_on_the_command_line_is_refused(override, message):
    with pytest.raises(CmmergeError, match=message.replace(".", r"\.")):
        check_overrides("finetune", [override])


def test_values_of_the_right_type_pass():
    for override in (
        "cpt.warmup=100",  # a whole number where a number is declared
        "cpt.head_warmup_lr=null",
        "cpt.packing=true",
        "finetune.class_weights=balanced",
        "finetune.epochs=2",
        "finetune.train_size=500",
        "cpt.report_to=[tensorboard]",  # free-form: checked when the Trainer is built
    ):
        assert check_overrides("finetune", [override]) is None, override


def test_every_shipped_config_sets_values_the_declarations_take():
    for experiment in group_options("experiment"):
        check_sections(compose("finetune", [f"experiment={experiment}"]))


def test_a_wrong_value_from_a_config_file_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(CmmergeError, match=r"cpt\.max_steps=1\.5: .*\(set in a config file"):
        check_sections(compose("cpt", ["cpt.max_steps=1.5"]))  # composed past the override check
    out = cmmerge("cpt", "++cpt.max_steps=1.5", f"run.root={tmp_path}", cwd=tmp_path)
    _assert_one_line_error(out, "cmmerge cpt: error: ", "cpt.max_steps=1.5", "whole number")
    assert not (tmp_path / "default" / "cpt").exists()
