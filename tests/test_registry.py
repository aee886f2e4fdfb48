"""The stage registry (:mod:`cmmerge.stages.registry`): every entry is a stage with a config,
a ``run`` and, where it has a folder, the spec of that folder; the command line lists it
without importing any stage; ``status`` looks for stages in its folders only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cmmerge.commands.status import _stage_folders
from cmmerge.config import specs as specs
from cmmerge.presets import CONFIG_DIR
from cmmerge.stages.registry import STAGES, Stage, stage_folders, stage_of


@pytest.mark.parametrize("name", list(STAGES))
def test_every_entry_is_a_stage_with_a_config_and_a_run(name):
    stage = STAGES[name]
    assert stage.name == name and stage.help and len(stage.help) <= 90
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    assert stage.run is stage.command.run and stage.command.__name__ == f"cmmerge.commands.{name}"


def test_a_stage_with_a_folder_names_the_spec_of_that_folder():
    with_spec = {name: s for name, s in STAGES.items() if s.spec}
    assert sorted(with_spec) == sorted(
        ["data", "cpt", "extract", "merge", "finetune", "graft", "evaluate", "prompt", "report"]
    )
    for name, stage in with_spec.items():
        kind = specs.spec_type(name)
        assert issubclass(kind, specs.StageSpec) and kind.__name__ == stage.spec
        assert kind.STAGE == stage.folder, name  # the spec's folder is the registry's
    assert STAGES["report"].folder == "report"
    # how each runs under a launch: training and scoring on every rank, CPT resumable
    assert {n for n, s in STAGES.items() if s.all_ranks} == {"cpt", "finetune", "graft", "evaluate"}
    assert {n for n, s in STAGES.items() if s.resumable} == {"cpt"}
    graft = specs.GraftSpec(run_root="/r", run_name="n")
    assert stage_of(graft).name == "graft" and stage_of(specs.ReportSpec()).name == "report"
    with pytest.raises(KeyError, match="no spec for stage 'sweep'; specs: data, cpt, extract"):
        specs.spec_for(None, "sweep")  # type: ignore[arg-type]


def test_what_a_study_prunes_and_the_setting_that_keeps_it():
    pruned = {n: (s.kept_by, s.prunes) for n, s in STAGES.items() if s.prunes}
    assert pruned == {
        "merge": ("keep_merged", ("model/",)),
        "finetune": ("keep_models", ("model/", "adapter/", "sequential/")),
        "graft": ("keep_models", ("model/",)),
    }
    with pytest.raises(ValueError, match="prunes and kept_by go together"):
        Stage("x", "y", prunes=("model/",))


def test_the_command_line_lists_the_stages_without_importing_one():
    code = "import sys, cmmerge.cli; print(sorted(m for m in sys.modules if 'stages.' in m)); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["['cmmerge.stages.registry']", "False"]


def test_status_finds_stages_in_the_registry_folders_only(tmp_path):
    for folder in ("cpt/en-hi", "report", "logs/2026/x", "notes/mine", "merge/ties"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "manifest.json").write_text("{}")
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / ".partial-base-x-s0").mkdir()
    (tmp_path / ".partial-scratch").mkdir()  # not in a folder of stages
    assert stage_folders() == {
        "data", "cpt", "extract", "merge", "finetune", "evaluate", "prompt", "report"
    }  # fmt: skip
    assert [p.relative_to(tmp_path).as_posix() for p in _stage_folders(tmp_path)] == [
        "cpt/en-hi",
        "finetune/base-x-s0",
        "merge/ties",
        "report",
    ]
