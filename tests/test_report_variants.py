"""Variants in the report (issue 28): fine-tunes of one arm made with different settings are
rows of their own, labelled with the settings they differ in, and compared only like for like.

The run directories are written as the stages write them (config views from the stage specs,
upstream stages as inputs), with made-up predictions: the report reads manifests, metrics and
predictions only, so no model is trained."""

from __future__ import annotations

import csv

from conftest import compose
from run_dirs import BASE, TV
from run_dirs import config as _cfg
from run_dirs import finetune as _finetune

from cmmerge.commands import report, status
from cmmerge.config.specs import CptSpec


def _report(tmp_path, run, *extra):
    cfg = compose("report", [f"run.root={tmp_path}", f"run.name={run}", *BASE,
                             "report.n_resamples=50", *extra])  # fmt: skip
    report.run(cfg)
    out = tmp_path / run / "report"
    text = (out / "report.md").read_text()
    study = list(csv.DictReader(open(out / "study.csv", encoding="utf-8")))
    against = text.split("## Against")[1].split("\n## ")[0]
    return text.split("## Against")[0], against, study


def _rows(table: str) -> dict[str, str]:
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    return {line.split(" | ")[0][2:]: line for line in lines}


def test_a_longer_full_ft_is_a_variant_and_never_compared_across_epochs(tmp_path):
    """The issue's case: Full FT and TV->FT for one epoch, then Full FT for two."""
    _finetune(_cfg(tmp_path, "v2", "init=base", "finetune.epochs=1"), 0.50)
    _finetune(_cfg(tmp_path, "v2", *TV, "finetune.epochs=1"), 0.55)
    _finetune(_cfg(tmp_path, "v2", "init=base", "finetune.epochs=2"), 0.70)

    table, against, study = _report(tmp_path, "v2", "finetune.epochs=2", "report.all_variants=true")
    rows = _rows(table)
    assert {"Full FT [epochs=1]", "Full FT [epochs=2]", "TV->FT [epochs=1]"} <= set(rows)
    assert list(rows).index("Full FT [epochs=2]") < list(rows).index("Full FT [epochs=1]")
    assert "| Full FT |" not in table and "**0.7" in rows["Full FT [epochs=2]"]
    # TV->FT is compared with the one-epoch Full FT only; no Full FT with another Full FT
    versus = [line for line in against.splitlines() if " | Full FT" in line]
    assert len(versus) == 1 and versus[0].startswith("| TV->FT [epochs=1] |")
    assert "| Full FT [epochs=1] | +0.0" in versus[0]
    by_arm = {r["arm"]: r for r in study if r["test_task"] == "sentiment-en-hi"}
    assert by_arm["Full FT [epochs=2]"]["diff_vs_full_ft"] == ""
    assert by_arm["Full FT [epochs=1]"]["diff_vs_full_ft"] == ""
    tv = by_arm["TV->FT (lambda=0.5) [epochs=1]"]
    assert tv["partner_vs_full_ft"] == "Full FT [epochs=1]" and 0.0 < float(tv["diff_vs_full_ft"])
    assert by_arm["Full FT [epochs=2]"]["configured"] == "True"

    # without all_variants: the configuration's Full FT only, the other named in a note
    table, _, _ = _report(tmp_path, "v2", "finetune.epochs=2")
    assert "| Full FT [epochs=2] |" in table and "| Full FT [epochs=1] |" not in table
    assert "not shown: Full FT [epochs=1] (report.all_variants=true" in table

    shown = status.run(compose("status", [f"run.root={tmp_path}", "run.name=v2", *BASE,
                                          "finetune.epochs=2", "init=base"]))  # fmt: skip
    listed = {r["arm"]: r["this config"] for r in shown["variants"]}
    assert listed["Full FT [epochs=2]"] == "yes" and listed["Full FT [epochs=1]"] == ""


def test_two_cpt_variants_times_two_fine_tune_settings(tmp_path):
    for lr in ("0.001", "0.0005"):
        _finetune(_cfg(tmp_path, "grid", "init=base", f"finetune.lr={lr}"), 0.50)
        for steps, acc in (("100", 0.60), ("200", 0.65)):
            keys = [f"finetune.lr={lr}", f"cpt.max_steps={steps}"]
            _finetune(_cfg(tmp_path, "grid", "init=cpt", *keys), acc)
            _finetune(_cfg(tmp_path, "grid", *TV, *keys), acc + 0.05)

    table, against, study = _report(tmp_path, "grid", "report.all_variants=true")
    rows = _rows(table)
    cpt = {s: CptSpec.from_config(_cfg(tmp_path, "grid", f"cpt.max_steps={s}")).folder_id
           for s in ("100", "200")}  # fmt: skip
    assert len(rows) == 10  # Full FT x 2 lr, CPT->FT and TV->FT x 2 CPTs x 2 lr
    assert f"CPT->FT [cpt {cpt['200']}, max_steps=200, lr=0.0005]" in rows
    assert f"TV->FT [cpt {cpt['100']}, max_steps=100, lr=0.001]" in rows
    assert "Full FT [lr=0.0005]" in rows and "Full FT [lr=0.001]" in rows
    for row in study:
        if row["test_task"] != "sentiment-en-hi" or row["arm"].startswith("Full FT"):
            continue
        lr = "lr=0.0005" if "lr=0.0005" in row["arm"] else "lr=0.001"
        assert row["partner_vs_full_ft"] == f"Full FT [{lr}]", row
        if row["arm"].startswith("TV->FT"):  # its own CPT and learning rate
            steps = "max_steps=200" if "max_steps=200" in row["arm"] else "max_steps=100"
            partner = row["partner_vs_cpt_ft"]
            assert lr in partner and steps in partner and partner.startswith("CPT->FT")
            assert abs(float(row["diff_vs_cpt_ft"]) - 0.05) < 0.03
    # Full FT against CPT->FT: two CPT variants fit, so it is left out with a note
    full = [line for line in against.splitlines() if line.startswith("| Full FT [lr=0.001]")]
    assert any("left out: several CPT->FT variants fit" in line for line in full)


def test_a_report_over_runs_whose_fine_tunes_differ_in_one_key(tmp_path):
    for run, lr in (("a", "0.001"), ("b", "0.0005")):
        _finetune(_cfg(tmp_path, run, "init=base", f"finetune.lr={lr}"), 0.50)
        _finetune(_cfg(tmp_path, run, "init=cpt", f"finetune.lr={lr}"), 0.60)
    _finetune(_cfg(tmp_path, "c", "init=cpt", "finetune.lr=0.0005"), 0.70)  # no Full FT in c
    _finetune(_cfg(tmp_path, "d", "init=cpt", "finetune.lr=0.0002"), 0.70)  # none like it at all
    (tmp_path / "all").mkdir()
    table, against, study = _report(tmp_path, "all", "runs=[a,b,c,d]")
    rows = _rows(table)
    assert "Full FT [lr=0.001]" in rows and "Full FT [lr=0.0005]" in rows
    assert "CPT->FT [lr=0.0005] [b]" in rows and "CPT->FT [lr=0.0005] [c]" in rows
    partner = {(r["run"], r["arm"]): r["partner_vs_full_ft"] for r in study}
    assert partner[("a", "CPT->FT [lr=0.001]")] == "Full FT [lr=0.001]"
    assert partner[("b", "CPT->FT [lr=0.0005]")] == "Full FT [lr=0.0005]"
    assert partner[("c", "CPT->FT [lr=0.0005]")] == "Full FT [lr=0.0005] [b]"
    assert partner[("d", "CPT->FT [lr=0.0002]")] == ""
    left_out = next(line for line in against.splitlines() if "CPT->FT [lr=0.0002]" in line)
    assert "left out: no Full FT with the same settings (they differ in finetune.lr)" in left_out


def test_a_multi_source_merge_is_its_own_arm_not_a_variant_of_the_single_source_one():
    from cmmerge.reporting.study import Arm
    from cmmerge.reporting.variants import base_name, tag_variants

    names = {
        "TV->FT (lambda=0.5)": "TV->FT",
        "TV->FT (lambda=0.5) (LoRA)": "TV->FT",
        "TIES->FT (cpt+english-sentiment-en-hi, lambda=1)": (
            "TIES->FT (cpt+english-sentiment-en-hi)"
        ),
        "TV->FT (English labels, lambda=0.5)": "TV->FT",
        "Full FT (English labels)": "Full FT",
        "Sequential FT (english-sentiment-en-hi first)": "Sequential FT",
        "English FT + τ_cpt (TIES, lambda=0.5)": "English FT + τ_cpt",
    }
    assert {k: base_name(k) for k in names} == names
    # the single-source TIES arm descends from extract; the multi-source one from a fine-tune
    single = Arm(
        "r",
        "g1",
        "TIES->FT (lambda=1)",
        "t",
        None,
        [],
        kind="TIES->FT (lambda=1)",
        settings={"merge.method": "ties", "extract.dtype": "null", "merge.weights": "[1.0]"},
    )
    multi = Arm("r", "g2", "TIES->FT (cpt+e, lambda=1)", "t", None, [],
                kind="TIES->FT (cpt+e, lambda=1)",
                settings={"merge.method": "ties", "source.task.name": "e",
                          "merge.weights": "[1.0, 1.0]"})  # fmt: skip
    longer = Arm(
        "r",
        "g3",
        "TIES->FT (lambda=1)",
        "t",
        None,
        [],
        kind="TIES->FT (lambda=1)",
        settings={**single.settings, "finetune.epochs": "2"},
    )
    single.settings["finetune.epochs"] = "1"
    full = Arm("r", "g0", "Full FT", "t", None, [], kind="Full FT",
               settings={"finetune.epochs": "1"})  # fmt: skip
    tag_variants([full, single, multi, longer])
    assert multi.arm == "TIES->FT (cpt+e, lambda=1)"  # no tag: nothing else is its arm
    assert (single.tag, longer.tag) == ("epochs=1", "epochs=2")
