"""The report's "Merge methods against each other" section (the paper's TV vs TIES, issue 23):
each method at the λ it chose on validation, paired on the same test examples and seeds, with the
seed-level statistics; a steady difference is called, one inside the seed spread is not; arms of
another CPT are not paired. On run directories written without training (tests/run_dirs.py)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
from conftest import compose
from run_dirs import BASE, TV, config, finetune, predictions
from sklearn.metrics import f1_score

from cmmerge.commands import report

SEEDS = (0, 1, 2, 3, 4)
REF = [0.60, 0.70, 0.62, 0.68, 0.65]  # Full FT's accuracy per seed
STEADY = [r + d for r, d in zip(REF, [+0.05, +0.04, +0.06, +0.05, +0.045], strict=True)]
NOISY = [r + d for r, d in zip(REF, [+0.08, -0.02, +0.07, -0.03, +0.05], strict=True)]


def _ties(scale: float, *extra: str) -> list[str]:
    return ["init=merged", "method=ties", f"lambda={scale}", "density=0.2", *extra]


def _report(tmp_path, run: str) -> tuple[str, list[dict]]:
    cfg = compose("report", [f"run.root={tmp_path}", f"run.name={run}", *BASE,
                             "report.n_resamples=200"])  # fmt: skip
    report.run(cfg)
    out = tmp_path / run / "report"
    text = (out / "report.md").read_text(encoding="utf-8")
    path = out / "methods.csv"
    rows = list(csv.DictReader(open(path, encoding="utf-8"))) if path.exists() else []
    return text, rows


def _macro_f1(accuracy: float, seed: int) -> float:
    """Macro-F1 of the predictions run_dirs writes for ``accuracy`` on ``seed``."""
    gold, pred = predictions(accuracy, seed)
    return float(f1_score(gold, pred, average="macro"))


def _section(text: str) -> str:
    return text.split("\n## Merge methods against each other\n", 1)[1].split("\n## ", 1)[0]


def test_tv_against_ties_at_their_chosen_lambdas_over_seeds(tmp_path):
    """TV->FT steadily above TIES->FT (the λ TIES chose on validation, not the other): called
    for TV over seeds, with the difference of the two arms' means; a TIES that differs from TV by
    less than the seed spread is not called, though the example-level test alone would."""
    finetune(config(tmp_path, "a", "init=base"), REF, SEEDS)
    finetune(config(tmp_path, "a", *TV), STEADY, SEEDS)
    finetune(config(tmp_path, "a", *_ties(0.5)), REF, SEEDS, val=0.5)  # chosen
    finetune(config(tmp_path, "a", *_ties(1.0)), STEADY, SEEDS, val=0.4)  # not chosen
    text, rows = _report(tmp_path, "a")
    assert "| TV->FT (λ=0.5) | TIES->FT (λ=0.5 d=0.2) | sentiment-en-hi |" in _section(text)
    (row,) = rows
    assert (row["arm"], row["versus"], row["lambda"], row["versus_lambda"]) == (
        "TV->FT", "TIES->FT", "0.5", "0.5",
    )  # fmt: skip
    assert row["better"] == "TV->FT" and row["n_seeds"] == "5" and row["seed_test"] == "t-test"
    assert float(row["seed_p"]) < 0.01 and float(row["seed_boot_p"]) < 0.05
    expected = np.mean([_macro_f1(STEADY[s], s) - _macro_f1(REF[s], s) for s in SEEDS])
    assert np.isclose(float(row["difference"]), expected, atol=1e-12)
    assert float(row["ci_low"]) > 0

    finetune(config(tmp_path, "b", "init=base"), REF, SEEDS)
    finetune(config(tmp_path, "b", *TV), STEADY, SEEDS)
    finetune(config(tmp_path, "b", *_ties(0.5)), NOISY, SEEDS)
    _, (row,) = _report(tmp_path, "b")
    assert row["better"] == "neither" and float(row["seed_p"]) > 0.05
    assert float(row["example_p"]) < 0.05  # the examples alone would have called it


def test_merges_of_another_cpt_or_with_three_seeds(tmp_path):
    """A TIES->FT from a longer CPT is not paired with TV->FT from the study's CPT (no section,
    no methods.csv); on three seeds the section warns."""
    finetune(config(tmp_path, "c", *TV), STEADY, SEEDS)
    finetune(config(tmp_path, "c", *_ties(0.5, "cpt.max_steps=7")), REF, SEEDS)
    text, rows = _report(tmp_path, "c")
    assert "Merge methods against each other" not in text and rows == []

    finetune(config(tmp_path, "d", *TV), STEADY[:3], SEEDS[:3])
    finetune(config(tmp_path, "d", *_ties(0.5)), REF[:3], SEEDS[:3])
    text, (row,) = _report(tmp_path, "d")
    assert row["n_seeds"] == "3"
    assert "rest on fewer than 5 seeds (fewest: 3)" in _section(text)


def _claims_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "claims_table.py"
    spec = importlib.util.spec_from_file_location("claims_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_claims_table_is_made_from_the_reports(tmp_path):
    """scripts/claims_table.py (the table that opens docs/results.md): one column per report,
    the per-seed mean difference in points with the seed-level p, bold only where both
    seed-level tests agree, TV vs TIES named by the one ahead; a claim no report has is no row."""
    finetune(config(tmp_path, "a", "init=base"), REF, SEEDS)
    finetune(config(tmp_path, "a", *TV), STEADY, SEEDS)
    finetune(config(tmp_path, "a", *_ties(0.5)), NOISY, SEEDS)
    _, (row,) = _report(tmp_path, "a")
    claims = _claims_script()
    text = claims.table([("steady", tmp_path / "a/report"), ("again", tmp_path / "a/report")])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert sorted(lines) == ["TIES->FT beats Full FT", "TV->FT beats Full FT", "TV->FT vs TIES->FT"]
    tv = lines["TV->FT beats Full FT"].split(" | ")[1]
    gain = np.mean([_macro_f1(STEADY[s], s) - _macro_f1(REF[s], s) for s in SEEDS])
    assert tv.startswith(f"**{100 * gain:+.1f} (p = 0.0") and tv.endswith(")**")
    ties = lines["TIES->FT beats Full FT"].split(" | ")[1]
    assert not ties.startswith("**")  # noisy: inside the seed spread
    versus = lines["TV->FT vs TIES->FT"].split(" | ")[1]
    numbers = (float(row[k]) for k in ("difference", "seed_p", "seed_boot_p"))
    assert versus == f"TV {claims.cell(*numbers)}"
    assert claims.cell(-0.066, 0.047, 0.010) == "**-6.6 (p = 0.047)**: the reverse"
    assert claims.cell(0.032, 0.143, 0.008) == "+3.2 (p = 0.14 [0.008])"
