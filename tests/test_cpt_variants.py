"""A CPT made with any setting is found by the stages after it (issue 21, item 1).

One finished CPT variant that matches the command's model, corpus, LoRA setting and data is used
by ``extract``, ``merge``, ``finetune init=cpt|merged``, ``evaluate``, ``graft``, ``report`` and
``status`` without repeating its ``cpt.*`` keys, and the closing line names it; several refuse in
one line that lists them; ``cpt.id=<id>`` or the keys pick one. The CLI runs in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zoo
from conftest import FAST

from cmmerge.cli import main
from cmmerge.io.manifest import read_manifest

# the CPT's own keys go to `cmmerge cpt` only: later commands give none
CPT_KEYS = [k for k in FAST if k.startswith("cpt.")] + ["cpt.eval_fraction=0.1"]
OTHER = [k for k in FAST if not k.startswith("cpt.")]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``cmmerge *args`` in this process: (exit status, stdout, the error lines)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    errors = "\n".join(line for line in err.splitlines() if ": error: " in line)
    return code, out, errors


def closing(out: str, stage: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(f"cmmerge {stage}:")]
    assert lines, out
    return lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return zoo.small_data(tmp_path_factory.mktemp("variant-data"), n_corpus=120, n_task=24)


def _cpt_ids(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "cpt").iterdir() if (p / "manifest.json").exists())


def _made(folder: Path, prefix: str) -> Path:
    """The one finished stage folder under ``folder`` whose name starts with ``prefix``."""
    (found,) = [p for p in folder.iterdir() if p.name.startswith(prefix) and read_manifest(p)]
    return found


def _model_keys(kind: str, tmp_path: Path) -> list[str]:
    if kind.startswith("zoo:"):
        return [f"model.name_or_path={zoo.make(kind[4:], tmp_path / 'zoo')}"]
    return [f"model={kind}"]


@pytest.mark.parametrize("kind", ["tiny-xlmr", "tiny-llama", "zoo:xlm-roberta-base"])
def test_the_one_cpt_variant_is_used_downstream(kind, tmp_path, data, capsys):
    common = [*_model_keys(kind, tmp_path), *OTHER, *data, f"run.root={tmp_path}", "run.name=r"]
    run = tmp_path / "r"
    # a CPT made with non-default keys: 3 steps, another learning rate
    code, out, _ = cli(capsys, "cpt", *common, *CPT_KEYS, "cpt.max_steps=3", "cpt.lr=0.002")
    assert code == 0
    (variant,) = _cpt_ids(run)
    assert variant.startswith("custom-") and variant in closing(out, "cpt")

    note = f"cpt {variant}, the run's only CPT for these settings"
    code, out, err = cli(capsys, "extract", *common)
    assert code == 0, err
    assert note in closing(out, "extract")
    assert read_manifest(run / "extract" / variant) is not None

    tv = ["method=tv", "lambda=0.5"]
    code, out, err = cli(capsys, "merge", *common, *tv)
    assert code == 0, err
    merge_dir = run / "merge" / f"task_arithmetic-l0.5@{variant}"
    assert note in closing(out, "merge") and read_manifest(merge_dir) is not None
    # the merge recorded the variant's extract as its input: the folder chain is the variant's
    inputs = [item["path"] for item in read_manifest(merge_dir)["inputs"]]
    assert any(path.endswith(f"extract/{variant}") for path in inputs)

    code, out, err = cli(capsys, "finetune", *common, *tv, "init=merged")
    assert code == 0, err
    assert note in closing(out, "finetune")
    finetuned = _made(run / "finetune", f"task_arithmetic-l0.5@{variant}-custom-")

    code, out, err = cli(capsys, "evaluate", *common, *tv, "init=merged")
    assert code == 0, err
    assert note in closing(out, "evaluate")
    scored = run / "evaluate" / finetuned.name / "custom"
    metrics = json.loads((scored / "metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and metrics["n"] == 24

    code, out, err = cli(capsys, "status", *common, *tv, "init=merged")
    assert code == 0, err
    assert f"| cpt/{variant} | - | cpt.id={variant} | uses it |" in out
    assert f"this config resolves to cpt/{variant}" in out
    assert "| missing |" not in out  # nothing of this config's chain is taken for missing

    if kind != "tiny-xlmr":
        return
    # the rest of the stages that read a CPT, on the encoder: CPT->FT, graft, report
    code, out, err = cli(capsys, "finetune", *common, "init=cpt")
    assert code == 0, err
    assert note in closing(out, "finetune")
    assert _made(run / "finetune", f"cpt@{variant}-custom-")
    code, _, err = cli(capsys, "finetune", *common, "init=base")
    assert code == 0, err
    graft = ["onto=custom", "lambda=0.5"]
    code, out, err = cli(capsys, "graft", *common, *graft)
    assert code == 0, err
    assert note in closing(out, "graft")
    assert _made(run / "finetune", f"task_arithmetic-l0.5@{variant}+")
    code, out, err = cli(capsys, "report", *common)
    assert code == 0, err
    report = (run / "report" / "report.md").read_text()
    assert "CPT->FT" in report and "TV->FT" in report


def test_several_variants_refuse_in_one_line_and_a_key_picks_one(tmp_path, data, capsys):
    common = [
        "model=tiny-xlmr",
        *OTHER,
        *data,
        f"run.root={tmp_path}",
        "run.name=r",
    ]
    run = tmp_path / "r"
    for steps in (2, 3):
        assert cli(capsys, "cpt", *common, *CPT_KEYS, f"cpt.max_steps={steps}")[0] == 0
    first, second = _cpt_ids(run)
    steps = {
        folder: read_manifest(run / "cpt" / folder)["config"]["cpt"]["max_steps"]
        for folder in (first, second)
    }

    code, out, err = cli(capsys, "extract", *common)
    assert code == 2 and len(err.splitlines()) == 1
    assert "2 CPT variants" in err
    for folder in (first, second):  # each with the setting that differs and its override
        assert f"{folder} (max_steps={steps[folder]}; cpt.id={folder})" in err
    assert not (run / "extract").exists()  # nothing made

    code, out, err = cli(capsys, "extract", *common, f"cpt.id={second}")
    assert code == 0, err
    assert f"[cpt {second} (cpt.id)]" in closing(out, "extract")
    assert read_manifest(run / "extract" / second) is not None
    # the keys in which they differ pick the other one
    code, out, err = cli(capsys, "extract", *common, f"cpt.max_steps={steps[first]}")
    assert code == 0, err
    assert f"[cpt {first}, the run's only CPT for these settings]" in closing(out, "extract")
    assert read_manifest(run / "extract" / first) is not None
    # keys that name a finished CPT use it as it is; keys that name none say it is not made
    code, out, err = cli(capsys, "extract", *common, *CPT_KEYS, f"cpt.max_steps={steps[first]}")
    assert code == 0 and "up to date" in closing(out, "extract")
    code, out, err = cli(capsys, "extract", *common, "cpt.max_steps=5")
    assert code == 2 and "extract needs cpt, not made yet" in err

    code, out, err = cli(capsys, "extract", *common, "cpt.id=en-hi-000000")
    assert code == 2 and "no finished CPT" in err and first in err and second in err
    # a variant of another model is not taken for this one
    code, out, err = cli(capsys, "extract", *[c for c in common if c != "model=tiny-xlmr"],
                         "model=tiny-llama", f"cpt.id={first}")  # fmt: skip
    assert code == 2 and "other settings" in err and "model: tiny-xlmr there" in err

    code, out, err = cli(capsys, "status", *common, "init=cpt")
    assert code == 0, err
    assert f"| cpt/{first} | max_steps={steps[first]} | cpt.id={first} |  |" in out
    assert "pick a variant with cpt.id=<id>" in out
    code, out, err = cli(capsys, "status", *common, "init=cpt", f"cpt.id={first}")
    assert code == 0 and f"this config resolves to cpt/{first}" in out
