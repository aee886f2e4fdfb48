"""Config mistakes get one line in cmmerge's voice: a "did you mean" from the real keys or
choices, the expected type of a value, exit status 2 and no traceback (issue 15, item 3)."""

from __future__ import annotations

import pytest
from conftest import compose
from test_cli import _assert_one_line_error, cmmerge

from cmmerge.config.overrides import check_overrides, override_args
from cmmerge.config.values import config_int, merge_scale
from cmmerge.errors import CmmergeError


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("lamda=0.5", ["unknown key 'lamda'", "did you mean lambda?"]),
        ("lambda=abc", ["lambda=abc", "takes a number", "e.g. lambda=0.5"]),
        ("model=nonexistent", ["unknown model 'nonexistent'", "choose one of:", "tiny-xlmr"]),
        ("task=nonexistent", ["unknown task 'nonexistent'", "choose one of:", "sentiment-en-hi"]),
        ("model=xlm-r", ["unknown model 'xlm-r'", "did you mean model=xlmr?"]),
    ],
)
def test_config_mistakes_are_one_line_with_a_suggestion(tmp_path, override, needles):
    out = cmmerge("merge", override, f"run.root={tmp_path}", cwd=tmp_path)
    _assert_one_line_error(out, "cmmerge merge: error: ", *needles)
    assert not (tmp_path / "default").exists() and not (tmp_path / "runs").exists()


def test_debug_true_keeps_the_traceback_of_a_config_mistake(tmp_path):
    out = cmmerge("merge", "lamda=0.5", "debug=true", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr and "lamda" in out.stderr


def test_a_hydra_error_after_the_checks_is_one_line_too(tmp_path):
    out = cmmerge("data", "run.name=${nope}", f"run.root={tmp_path}", cwd=tmp_path)
    _assert_one_line_error(out, "nope")


@pytest.mark.parametrize(
    ("stage", "overrides", "multirun", "message"),
    [
        ("finetune", ["lr=1e-3"], False, "did you mean cpt.lr or finetune.lr?"),
        ("finetune", ["finetune.lrr=1e-3"], False, "did you mean finetune.lr?"),
        ("finetune", ["finetune.epochs=many"], False, "finetune.epochs takes a number"),
        ("finetune", ["force=maybe"], False, "force takes true or false"),
        ("finetune", ["finetune.sequential=hate-en-hi"], False, "takes a list"),
        ("finetune", ["[seed=0,1,2]"], False, "drop the brackets"),
        ("finetune", ["seed=0,1,2"], False, "sweep"),
        ("sweep", ["lambda=0.5,abc"], True, "lambda takes a number"),
        ("sweep", ["method=tv,tis"], True, "did you mean method=ties?"),
        ("finetune", ["mdoel=xlmr"], False, "did you mean model?"),
        ("finetune", ["nothing_like_it=1"], False, "--cfg job` lists the keys"),
    ],
)
def test_check_overrides_refuses(stage, overrides, multirun, message):
    with pytest.raises(CmmergeError, match="^.*" + message.replace("?", r"\?").replace("[", r"\[")):
        check_overrides(stage, overrides, multirun)


def test_check_overrides_accepts_what_the_readme_uses():
    ok = [
        (["model=tiny-llama", "task=custom", "task.train=x.csv", "task.labels=[a,b]"], False),
        (["lambda=0.5", "density=0.2", "method=tv", "weights=[1,0.5]", "output=/tmp/x"], False),
        (["lambda=0.1,0.3", "method=task_arithmetic,ties", "seed=range(0,3)"], True),
        (["+extra=1", "hydra.verbose=true", "run.name=${now:%H}", "dtype=bfloat16"], False),
        (["finetune.class_weights=balanced", "cpt.max_steps=null", "experiment=demo"], False),
        (["eval_tasks=[sentiment-en-ta]", "model.tiny.hidden_size=32", "seed=1"], False),
    ]
    for overrides, multirun in ok:
        check_overrides("sweep" if multirun else "finetune", overrides, multirun)


def test_override_args_leaves_out_hydras_options():
    args = ["--cfg", "job", "-m", "lambda=1", "--package", "model", "--info", "seed=2"]
    assert override_args(args) == ["lambda=1", "seed=2"]


def test_typed_reads_name_the_key_and_the_type():
    cfg = compose("merge", ["lambda=abc", "seed=x"])
    with pytest.raises(CmmergeError, match=r"^lambda=abc: expected a number, e.g. lambda=0.5$"):
        merge_scale(cfg)
    with pytest.raises(CmmergeError, match="seed=x: expected an integer"):
        config_int(cfg, "seed")
    assert merge_scale(compose("merge", ["lambda=1"])) == 1.0


def _count_compositions(monkeypatch) -> list[int]:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    calls: list[int] = []
    real = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(
        ConfigLoaderImpl,
        "load_configuration",
        lambda self, *a, **k: calls.append(1) or real(self, *a, **k),
    )
    return calls


def test_a_plain_run_composes_its_config_once_and_still_checks_its_keys(tmp_path, monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra

    get_mode, apply = Hydra.get_mode, ConfigLoaderImpl._apply_overrides_to_config
    calls = _count_compositions(monkeypatch)
    out = cmmerge("status", f"run.root={tmp_path}", "run.name=r", "seed=3")
    assert out.returncode == 0, out.stderr
    assert len(calls) == 1  # not a second one for hydra.mode, nor a third for the key check
    for override, needle in (
        ("sed=3", "did you mean seed?"),
        ("seed=abc", "seed takes a whole number"),
    ):
        calls.clear()
        out = cmmerge("status", f"run.root={tmp_path}", "run.name=r", override)
        _assert_one_line_error(out, "cmmerge status: error: ", needle)
        assert len(calls) == 1
    # Hydra is as it was after each command, and a Hydra option gets the separate check
    assert Hydra.get_mode is get_mode
    assert ConfigLoaderImpl._apply_overrides_to_config is apply
    calls.clear()
    out = cmmerge("status", f"run.root={tmp_path}", "sed=3", "--cfg", "job")
    _assert_one_line_error(out, "did you mean seed?")
    assert len(calls) == 1  # config_errors' own composition: Hydra never started


def test_an_experiment_in_the_users_own_config_folder_is_found(tmp_path):
    from cmmerge.config.cpt_variants import given_cpt_keys
    from cmmerge.presets import use_config_dirs

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\ncpt:\n  max_steps: 3\nrun:\n  name: mine\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    try:
        assert check_overrides("cpt", ["experiment=mine", searchpath]) is None
        # the CPT settings later stages pick their CPT variant with come from the user's file
        assert given_cpt_keys(["experiment=mine"])["max_steps"] == 3
        with pytest.raises(CmmergeError, match="did you mean experiment=mine"):
            check_overrides("cpt", ["experiment=mien", searchpath])
        with pytest.raises(CmmergeError, match="hydra.searchpath: no folder /nonexistent"):
            check_overrides("cpt", ["hydra.searchpath=[file:///nonexistent/conf]"])
        out = cmmerge("status", "experiment=mine", searchpath, f"run.root={tmp_path}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"{tmp_path}/mine" in out.stdout
        with pytest.raises(CmmergeError, match="unknown experiment 'mine'"):
            check_overrides("cpt", ["experiment=mine"])  # without the folder: not found
    finally:
        use_config_dirs([])
