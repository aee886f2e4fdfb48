"""Freshness seen from the outside: the report never pairs a fine-tune with an evaluation of an
earlier version of it, `cmmerge status` names every stage's state and what to run, and a sweep
job that fails is recorded while the others go on."""

from __future__ import annotations

import json

from conftest import FAST, compose

from cmmerge.commands import evaluate, finetune, report, status, sweep
from cmmerge.config.ids import stage_dirs


def _cfg(tmp_path, *extra):
    return compose("finetune", ["init=base", f"run.root={tmp_path}", "run.name=f", *FAST, *extra])


def test_report_marks_an_evaluation_of_an_earlier_fine_tune(tmp_path):
    cfg = _cfg(tmp_path)
    finetune.run(cfg)
    evaluate.run(cfg)
    rows = report.run(cfg)["table"]
    assert "stale" not in rows and "test_macro_f1" in rows

    finetune.run(_cfg(tmp_path, "force=true"))  # redone; its evaluation is now of the old one
    table = report.run(cfg)["table"]
    header = table.splitlines()[0]
    assert "stale" in header
    assert f"evaluate/{stage_dirs(cfg)['finetune'].name}/sentiment-en-hi" in table
    cells = dict(zip(header.split("|"), table.splitlines()[2].split("|"), strict=True))
    assert cells.get(" test_macro_f1 ", " ").strip() == ""  # the old test score is not shown

    evaluate.run(cfg)  # redone: its fine-tune changed
    table = report.run(cfg)["table"]
    assert "stale" not in table and "test_macro_f1" in table


def test_status_names_states_and_commands(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    finetune.run(cfg)
    bad = _cfg(tmp_path, "seed=1", "finetune.class_weights=bogus")
    try:
        finetune.run(bad)
    except Exception:  # noqa: BLE001 - the failure is what this test records
        pass
    merged = compose("status", [f"run.root={tmp_path}", "run.name=f", "init=merged", "method=ties"])
    rows = {r["stage"]: r for r in status.run(merged)["rows"]}
    ft = stage_dirs(cfg)["finetune"].relative_to(tmp_path / "f").as_posix()
    failed = stage_dirs(bad)["finetune"].relative_to(tmp_path / "f").as_posix()
    assert rows[ft]["state"] == "finished" and rows[ft]["command"] == ""
    assert rows[failed]["state"] == "failed" and "class_weights=bogus" in rows[failed]["detail"]
    for name in ("cpt", "extract", "merge"):
        folder = stage_dirs(merged)[name].relative_to(tmp_path / "f").as_posix()
        assert rows[folder]["state"] == "missing"
        assert rows[folder]["command"].startswith(f"cmmerge {name} ")
    assert "| failed |" in capsys.readouterr().out


def test_a_failed_sweep_job_is_recorded_and_the_summary_lists_it(tmp_path):
    cfg = compose("sweep", [f"run.root={tmp_path}", "run.name=s", *FAST, "lambda=0.5"])
    assert "failed" not in sweep.run(cfg)
    bad = compose("sweep", [f"run.root={tmp_path}", "run.name=s", *FAST, "lambda=0.5", "density=2"])
    out = sweep.run(bad)
    assert "density" in out["failed"]
    record = json.loads((tmp_path / "s" / "sweep" / "failures" / f"{out['job']}.json").read_text())
    assert record["lambda"] == 0.5 and "density" in record["error"]
    summary = (tmp_path / "s" / "sweep" / "summary.md").read_text()
    assert "Failed jobs" in summary and out["job"] in summary
    assert "ties-l0.5-d0.2" in summary  # the good job's row is still there
