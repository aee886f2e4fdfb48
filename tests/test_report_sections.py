"""The report's sections beyond the paper's table (issue 23): cross-pair transfer and no
code-mixed labels with the seed-level statistics, seed counts and the few-seeds warning; the λ
curve per task; the CPT-length curve. On run directories written without training
(tests/run_dirs.py), with per-seed scores whose answers are known."""

from __future__ import annotations

import csv
import re

import numpy as np
from conftest import compose
from omegaconf import OmegaConf
from run_dirs import BASE, TV, config, evaluation_work, finetune, predictions

from cmmerge.commands import report
from cmmerge.config.values import run_context
from cmmerge.stages.runner import run_transaction, stage_input

REF = [0.60, 0.70, 0.62, 0.68, 0.65]  # Full FT's accuracy per seed: sd 0.04
NOISY = [r + d for r, d in zip(REF, [+0.08, -0.02, +0.07, -0.03, +0.05], strict=True)]
STEADY = [r + d for r, d in zip(REF, [+0.05, +0.04, +0.06, +0.05, +0.045], strict=True)]
SEEDS = (0, 1, 2, 3, 4)
HI, TA = "sentiment-en-hi", "sentiment-en-ta"


def _report(tmp_path, run, *extra) -> tuple[str, dict]:
    cfg = compose("report", [f"run.root={tmp_path}", f"run.name={run}", *BASE,
                             "report.n_resamples=200", *extra])  # fmt: skip
    report.run(cfg)
    out = tmp_path / run / "report"
    study = list(csv.DictReader(open(out / "study.csv", encoding="utf-8")))
    return (out / "report.md").read_text(encoding="utf-8"), study


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str, start: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in section.splitlines()
        if line.startswith(f"| {start}")
    ]


def test_transfer_rows_carry_the_seed_level_test_its_seeds_and_the_warning(tmp_path):
    """TV->FT beats Full FT by about the same on every seed, CPT->FT by less than the seed
    spread: on the transfer task both differences look certain on the test examples, only the
    steady one is marked; a 3-seed run warns."""
    tests = {HI: 0.0, TA: -0.1}
    finetune(config(tmp_path, "five", "init=base"), REF, SEEDS, tests=tests)
    finetune(config(tmp_path, "five", "init=cpt"), NOISY, SEEDS, tests=tests)
    finetune(config(tmp_path, "five", *TV), STEADY, SEEDS, tests=tests)
    text, study = _report(tmp_path, "five")
    section = _section(text, "Cross-pair transfer")
    assert "Warning" not in section and "p seeds × examples" in section
    (tv_full, tv_cpt) = _rows(section, "TV->FT")
    assert tv_full[:3] == ["TV->FT", HI, TA] and tv_full[3].endswith("(n=5)†")
    assert tv_full[5] == "Full FT" and tv_cpt[5] == "CPT->FT" and tv_full[-1] == "5"
    assert float(tv_full[7].split()[0]) < 0.01 and tv_full[7].endswith("(t-test)")
    assert float(tv_cpt[7].split()[0]) > 0.05  # steady minus noisy: no ‡
    (cpt_full,) = _rows(section, "CPT->FT")
    assert not cpt_full[3].endswith("†") and float(cpt_full[9]) < 0.05  # examples: "certain"
    assert float(cpt_full[7].split()[0]) > 0.1 and cpt_full[-1] == "5"  # seeds: not
    (full,) = _rows(section, "Full FT")
    assert full[5] == "CPT->FT"  # Full FT against CPT->FT on the transfer task too
    row = next(r for r in study if r["arm"].startswith("TV->FT") and r["test_task"] == TA)
    assert row["seed_significant_vs_full_ft"] == "True" and row["n_seeds_vs_full_ft"] == "5"

    finetune(config(tmp_path, "three", "init=base"), REF[:3], SEEDS[:3], tests=tests)
    finetune(config(tmp_path, "three", *TV), STEADY[:3], SEEDS[:3], tests=tests)
    section = _section(_report(tmp_path, "three")[0], "Cross-pair transfer")
    assert "**Warning:** 1 of 1 comparisons rest on fewer than 5 seeds (fewest: 3)" in section


def _graft(root, ft_id, arm, task, accuracies, val, onto=None, merge_id=""):
    """Fine-tunes (or, with ``onto``, grafts) ``ft_id`` over seeds, scored on ``task`` only."""
    cfg = OmegaConf.create({"run": {"root": str(root.parent), "name": root.name}, "force": False})
    for seed, accuracy in enumerate(accuracies):
        ft_dir = root / "finetune" / f"{ft_id}-s{seed}"
        result = {"metrics": {"macro_f1": val}, "arm": arm, "task": "t" if onto else task,
                  "merge_id": merge_id, **({"onto": onto} if onto else {})}  # fmt: skip
        stage = "graft" if onto else "finetune"
        run_transaction(run_context(cfg), stage, ft_dir, {"seed": seed}, [], lambda d, r=result: r)

        gold, pred = predictions(accuracy, seed)
        work = evaluation_work(gold, pred, accuracy, accuracy)
        evaluation = root / "evaluate" / ft_dir.name / "t"
        inputs = [stage_input(ft_dir, "make it")]
        run_transaction(run_context(cfg), "evaluate", evaluation, {"task": "t"}, inputs, work)


def test_no_labels_rows_carry_the_seed_level_test_and_every_lambda(tmp_path):
    root = tmp_path / "nl"
    _graft(root, "base-e", "Full FT (English labels)", "e", REF, 0.5)
    _graft(root, "base-t", "Full FT", "t", [a + 0.1 for a in REF], 0.8)  # the ceiling
    ta = "English FT + τ_cpt (lambda={})"
    _graft(root, "task_arithmetic-l0.5@c+base-e", ta.format(0.5), "t", STEADY, 0.70, onto="e",
           merge_id="task_arithmetic-l0.5@c")  # fmt: skip
    _graft(root, "task_arithmetic-l1@c+base-e", ta.format(1), "t", NOISY, 0.60, onto="e",
           merge_id="task_arithmetic-l1@c")  # fmt: skip
    _graft(root, "ties-l0.5-d0.2@c+base-e", "English FT + τ_cpt (TIES, lambda=0.5)", "t", NOISY,
           0.65, onto="e", merge_id="ties-l0.5-d0.2@c")  # fmt: skip
    text, _ = _report(tmp_path, "nl")
    section, every = (
        text.split("## No code-mixed labels", 1)[1].split("\n## ", 1)[0].split("Every λ")
    )
    assert "Warning" not in section
    (steady,) = _rows(section, "English FT + τ_cpt |")
    assert steady[1] == "e + τ_cpt" and steady[2].endswith("(n=5)†") and steady[3] == "0.5"
    assert steady[4] == "Full FT (English labels)" and steady[-1] == "5"
    assert float(steady[6].split()[0]) < 0.01 and float(steady[8]) < 0.05
    (noisy,) = _rows(section, "English FT + τ_cpt (TIES)")
    assert not noisy[2].endswith("†") and float(noisy[8]) < 0.05  # examples only
    assert float(noisy[6].split()[0]) > 0.1 and noisy[-1] == "5"
    (ceiling,) = _rows(section, "Full FT |")
    assert ceiling[1] == "t (ceiling)" and ceiling[2].endswith("†")
    (source,) = _rows(section, "Full FT (English labels)")
    assert source[4:] == ["", "", "", "", "", "5"]  # not compared with itself
    lambdas = _rows(every, "English FT + τ_cpt |")
    assert [(r[1], r[2], r[4]) for r in lambdas] == [
        ("0.5", "0.7000 ± 0.0000 (n=5)", "yes"),
        ("1", "0.6000 ± 0.0000 (n=5)", ""),
    ]


def test_the_lambda_curve_per_task_marks_the_lambda_chosen_on_validation(tmp_path):
    """TV over three λ and TIES over two, two seeds: every λ's validation and test macro-F1
    (mean ± sd) in the table, the one best on validation chosen although another is best on
    test, and the plot."""
    finetune(config(tmp_path, "lam", "init=base"), 0.50)
    vals = {"0.1": [0.50, 0.52], "0.5": [0.70, 0.72], "1.0": [0.60, 0.66]}
    tests = {"0.1": 0.55, "0.5": 0.60, "1.0": 0.70}
    for scale, val in vals.items():
        tv = ["init=merged", "method=task_arithmetic", f"lambda={scale}"]
        finetune(config(tmp_path, "lam", *tv), tests[scale], val=val)
    for scale, val in (("0.5", 0.61), ("1.0", 0.64)):
        ties = ["init=merged", "method=ties", f"lambda={scale}", "density=0.2"]
        finetune(config(tmp_path, "lam", *ties), 0.58, val=val)
    text, study = _report(tmp_path, "lam")
    section = _section(text, "λ curves")
    tv = _rows(section, "TV->FT")
    assert [(r[1], r[2], r[4]) for r in tv] == [
        ("0.1", "0.5100 ± 0.0141 (n=2)", ""),
        ("0.5", "0.7100 ± 0.0141 (n=2)", "yes"),
        ("1", "0.6300 ± 0.0424 (n=2)", ""),
    ]
    means = {r["lambda"]: r for r in study if r["arm"].startswith("TV->FT")}
    for row, scale in zip(tv, ("0.1", "0.5", "1.0"), strict=True):
        mean, sd = (
            float(means[scale]["test_macro_f1_mean"]),
            float(means[scale]["test_macro_f1_sd"]),
        )
        assert row[3] == f"{mean:.4f} ± {sd:.4f} (n=2)"
    assert float(means["1.0"]["test_macro_f1_mean"]) > float(means["0.5"]["test_macro_f1_mean"])
    ties = _rows(section, "TIES->FT")
    assert [(r[1], r[4]) for r in ties] == [("0.5 (d=0.2)", ""), ("1 (d=0.2)", "yes")]
    assert "![lambda_sentiment-en-hi](lambda_sentiment-en-hi.png)" in section
    assert (tmp_path / "lam" / "report" / "lambda_sentiment-en-hi.png").stat().st_size > 10_000
    assert "Full FT" not in section


def test_the_cpt_length_curve_compares_each_length_with_the_shortest_over_seeds(tmp_path):
    """Three CPT lengths, each with CPT->FT and TV->FT over three seeds; a CPT that differs in
    its learning rate as well is no point of the curve."""
    steps = {"100": (0.55, 0.62), "300": (0.60, 0.64), "1000": (0.66, 0.63)}
    finetune(config(tmp_path, "len", "init=base"), 0.50, (0, 1, 2))
    for length, (cpt_acc, tv_acc) in steps.items():
        finetune(config(tmp_path, "len", "init=cpt", f"cpt.max_steps={length}"), cpt_acc, (0, 1, 2))
        finetune(config(tmp_path, "len", *TV, f"cpt.max_steps={length}"), tv_acc, (0, 1, 2))
    other = ["init=cpt", "cpt.max_steps=300", "cpt.lr=0.01"]
    finetune(config(tmp_path, "len", *other), 0.95, (0, 1, 2))
    variants = ",".join(f"{{max_steps:{s}}}" for s in steps)
    text, study = _report(tmp_path, "len", f"+pipeline.cpt_variants=[{variants}]")
    section = _section(text, "CPT length")
    head = next(line for line in section.splitlines() if line.startswith("| CPT length |"))
    assert head == "| CPT length | CPT | CPT->FT | TV->FT |"
    means = {}
    for r in study:
        if r["test_task"] == HI and "lr=0.01" not in r["arm"] and not r["arm"].startswith("Full"):
            length = re.search(r"max_steps=(\d+)", r["arm"]).group(1)
            means[(r["arm"].split(" ")[0], length)] = float(r["test_macro_f1_mean"])
    table = {r[0]: r for r in _rows(section, "") if r[0].endswith(" steps")}
    assert list(table) == ["100 steps", "300 steps", "1000 steps"]
    for length in steps:
        row = table[f"{length} steps"]
        assert row[2].startswith(f"{means[('CPT->FT', length)]:.4f} ± ") and "(n=3)" in row[2]
        assert row[3].startswith(f"{means[('TV->FT', length)]:.4f} ± ") and "λ=0.5" in row[3]
    versus = {(r[0], r[1]): r for r in _rows(section, "") if r[2:3] == ["100 steps"]}
    assert set(versus) == {(a, f"{s} steps") for a in ("CPT->FT", "TV->FT") for s in (300, 1000)}
    longer = versus[("CPT->FT", "300 steps")]
    diff = means[("CPT->FT", "300")] - means[("CPT->FT", "100")]
    assert np.isclose(float(longer[3].split()[0]), diff, atol=1e-4) and 0.03 < diff < 0.07
    assert float(longer[4].split()[0]) < 0.05 and longer[-1] == "3"
    assert "lr=0.01" not in section
    assert "**Warning:** 4 of 4 comparisons rest on fewer than 5 seeds (fewest: 3)" in section
    assert (tmp_path / "len" / "report" / "cpt_length_sentiment-en-hi.png").stat().st_size > 5000


def test_a_cpt_length_is_its_steps_or_else_its_epochs():
    from cmmerge.reporting.cpt_length import length

    assert length({"cpt.max_steps": "300", "cpt.epochs": "1"}) == ("steps", 300)
    assert length({"cpt.max_steps": "-1", "cpt.epochs": "5"}) == ("epochs", 5)
    assert length({"finetune.epochs": "3", "finetune.max_steps": "100"}) is None
