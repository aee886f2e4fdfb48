"""The study report over seeds: lambda chosen on validation (never test), mean ± sd, intervals
and paired tests against Full FT and CPT->FT, Markdown / CSV / LaTeX tables and plots, one
report over several run directories. Built on hand-made run directories with known answers."""

from __future__ import annotations

import csv

import numpy as np
from conftest import compose
from omegaconf import OmegaConf
from run_dirs import evaluation_work

from cmmerge.commands import report
from cmmerge.config.values import run_context
from cmmerge.stages.runner import run_transaction, stage_input

N = 600


def _predictions(accuracy: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1000 + seed)
    gold = np.random.default_rng(7).integers(0, 3, N)  # the same test set for every arm
    wrong = rng.random(N) > accuracy
    pred = np.where(wrong, (gold + rng.integers(1, 3, N)) % 3, gold)
    return gold.tolist(), pred.tolist()


def _evaluation(accuracy: float, seed: int):
    """(an evaluate stage's ``work`` writing the predictions of :func:`_predictions`, their
    macro-averaged recall, written as the macro-F1)."""
    gold, pred = _predictions(accuracy, seed)
    score = float(np.mean([np.mean(np.array(pred)[np.array(gold) == k] == k) for k in range(3)]))
    return evaluation_work(gold, pred, score, accuracy), score


def _finetune(root, ft_id, arm, seed, val, accuracy, merge_id="", task="t", evals=("t",)):
    cfg = OmegaConf.create({"run": {"root": str(root.parent), "name": root.name}, "force": False})
    ft_dir = root / "finetune" / f"{ft_id}-s{seed}"

    def ft_work(d):
        return {"metrics": {"macro_f1": val}, "arm": arm, "task": task, "merge_id": merge_id}

    run_transaction(run_context(cfg), "finetune", ft_dir, {"seed": seed}, [], ft_work)
    for eval_task in evals:
        acc = accuracy if eval_task == task else accuracy - 0.1

        ev_work, _ = _evaluation(acc, seed)
        run_transaction(
            run_context(cfg),
            "evaluate",
            root / "evaluate" / ft_dir.name / eval_task,
            {"task": eval_task},
            [stage_input(ft_dir, "make it")],
            ev_work,
        )


def _study(root):
    for seed in range(3):
        _finetune(root, "base-t", "Full FT", seed, 0.60, 0.60, evals=("t", "u"))
        _finetune(root, "cpt@c-t", "CPT->FT", seed, 0.62, 0.62)
        # lambda 0.5 wins on validation although lambda 1 is better on test
        _finetune(root, "ties-l0.5-d0.2@c-t", "TIES->FT (lambda=0.5)", seed, 0.70, 0.75,
                  merge_id="ties-l0.5-d0.2@c")  # fmt: skip
        _finetune(root, "ties-l1-d0.2@c-t", "TIES->FT (lambda=1)", seed, 0.65, 0.85,
                  merge_id="ties-l1-d0.2@c", evals=("t", "u"))  # fmt: skip


def test_study_tables_choose_lambda_on_validation_and_test_against_references(tmp_path):
    root = tmp_path / "r"
    _study(root)
    cfg = compose("report", [f"run.root={tmp_path}", "run.name=r", "report.n_resamples=300"])
    manifest = report.run(cfg)
    out = root / "report"
    text = (out / "report.md").read_text()
    paper_table = text.split("## Against")[0]
    assert "| TIES->FT | " in paper_table and "λ=0.5 d=0.2" in paper_table
    assert "λ=1 " not in paper_table  # the lambda best on test is not the one reported
    transfer = text.split("## Cross-pair transfer")[1].split("\n## ")[0]
    rows = [line for line in transfer.splitlines() if line.startswith("| Full FT")]
    assert len(rows) == 1 and rows[0].startswith("| Full FT | t | u | 0.") and "(n=3)" in rows[0]
    assert "TIES" not in transfer  # only the chosen lambda (0.5) reports, and it has no u
    ties_row = next(line for line in paper_table.splitlines() if line.startswith("| TIES->FT"))
    assert ties_row.count("**") == 2 and "(n=3)" in ties_row and "†‡" in ties_row
    full_row = next(line for line in paper_table.splitlines() if line.startswith("| Full FT"))
    assert "†" not in full_row and "**" not in full_row
    selection = manifest["lambda_selection"]["r/ties@c-t"]
    assert selection["lambda"] == 0.5 and len(selection["candidates"]) == 2

    rows = list(csv.DictReader(open(out / "study.csv")))
    ties = next(r for r in rows if r["group"] == "ties-l0.5-d0.2@c-t" and r["test_task"] == "t")
    assert ties["seeds"] == "0 1 2" and ties["lambda_chosen"] == "True"
    assert float(ties["ci_low"]) < float(ties["test_macro_f1_mean"]) < float(ties["ci_high"])
    assert 0.10 < float(ties["diff_vs_full_ft"]) < 0.20 and float(ties["p_vs_full_ft"]) < 0.01
    full = next(r for r in rows if r["group"] == "base-t" and r["test_task"] == "t")
    assert full["diff_vs_full_ft"] == "" and float(full["test_macro_f1_sd"]) > 0

    tex = (out / "study.tex").read_text()
    assert tex.startswith("\\begin{tabular}{lc}") and "\\toprule" in tex and "\\bottomrule" in tex
    assert "\\textbf{" in tex and "TIES$\\rightarrow$FT" in tex and "$^\\dagger$" in tex
    assert (out / "lambda_t.png").stat().st_size > 1000
    assert (out / "transfer.png").stat().st_size > 1000
    assert {"study.csv", "study.tex", "lambda_t.png", "transfer.png"} <= set(manifest["files"])


def test_one_report_over_several_run_directories(tmp_path):
    for name in ("a", "b"):
        for seed in range(2):
            _finetune(tmp_path / name, "base-t", "Full FT", seed, 0.6, 0.6)
    cfg = compose(
        "report", [f"run.root={tmp_path}", "run.name=both", "runs=[a,b]", "report.n_resamples=100"]
    )
    (tmp_path / "both").mkdir()
    report.run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "both" / "report" / "report.csv")))
    assert sorted({r["run"] for r in rows}) == ["a", "b"] and len(rows) == 4
    study = list(csv.DictReader(open(tmp_path / "both" / "report" / "study.csv")))
    assert sorted(r["run"] for r in study) == ["a", "b"]


def test_an_arm_of_two_runs_is_shown_per_run_and_compared_with_the_other_runs_full_ft(tmp_path):
    """A variant study in a run directory of its own (no Full FT there) is reported beside the
    main run's: its arms named per run, and tested against the main run's Full FT on the same
    test examples and seeds."""
    for seed in range(3):
        _finetune(tmp_path / "main", "base-t", "Full FT", seed, 0.60, 0.60)
        _finetune(tmp_path / "main", "cpt@c-t", "CPT->FT", seed, 0.55, 0.55)
        _finetune(tmp_path / "variant", "cpt@d-t", "CPT->FT", seed, 0.70, 0.75)
    cfg = compose(
        "report",
        [f"run.root={tmp_path}", "run.name=both", "runs=[main,variant]", "report.n_resamples=200"],
    )
    (tmp_path / "both").mkdir()
    report.run(cfg)
    text = (tmp_path / "both" / "report" / "report.md").read_text()
    table = text.split("## Against")[0]
    assert "| CPT->FT [main] |" in table and "| CPT->FT [variant] |" in table
    assert "| Full FT |" in table and "| CPT->FT |" not in table
    variant_row = next(line for line in table.splitlines() if "[variant]" in line)
    assert "**" in variant_row and "†" in variant_row  # best, and better than main's Full FT
    study = list(csv.DictReader(open(tmp_path / "both" / "report" / "study.csv")))
    variant = next(r for r in study if r["run"].endswith("variant"))
    main = next(r for r in study if r["run"].endswith("main") and r["arm"] == "CPT->FT")
    assert 0.10 < float(variant["diff_vs_full_ft"]) < 0.20 and float(variant["p_vs_full_ft"]) < 0.01
    assert float(main["diff_vs_full_ft"]) < 0


def _prompt(root, seed: int, shots: int, accuracy: float) -> None:
    """A finished prompting run: no validation score (nothing is trained)."""
    cfg = OmegaConf.create({"run": {"root": str(root.parent), "name": root.name}, "force": False})
    arm = f"Prompting ({shots}-shot)"

    write, score = _evaluation(accuracy, seed)

    def work(d):
        write(d)
        metrics = {"macro_f1": score, "accuracy": accuracy}
        return {"metrics": metrics, "arm": arm, "task": "t", "seed": seed}

    folder = root / "prompt" / f"m-base-t-k{shots}-s{seed}"
    run_transaction(run_context(cfg), "prompt", folder, {"shots": shots}, [], work)


def test_prompting_arms_are_rows_of_the_study_compared_over_their_seeds(tmp_path):
    root = tmp_path / "r"
    _study(root)
    for seed in range(3):
        _prompt(root, seed, 4, 0.40)
    cfg = compose("report", [f"run.root={tmp_path}", "run.name=r", "report.n_resamples=300"])
    report.run(cfg)
    text = (root / "report" / "report.md").read_text()
    paper_table = text.split("## Against")[0]
    row = next(line for line in paper_table.splitlines() if line.startswith("| Prompting"))
    assert row.startswith("| Prompting (4-shot) | 0.") and "(n=3)" in row and "†" not in row
    versus = [line for line in text.splitlines() if line.startswith("| Prompting (4-shot) | t |")]
    assert len(versus) == 2 and all(line.endswith("| 3 |") for line in versus)
    assert all(" | -0." in line for line in versus)  # below Full FT and CPT->FT
    rows = list(csv.DictReader(open(root / "report" / "study.csv")))
    prompt = next(r for r in rows if r["group"] == "m-base-t-k4")
    assert prompt["val_macro_f1_mean"] == "" and prompt["seeds"] == "0 1 2"
    assert float(prompt["diff_vs_full_ft"]) < -0.1
