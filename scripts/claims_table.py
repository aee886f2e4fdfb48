"""The paper's claims, one column per study: the table that opens docs/results.md, made from the
``study.csv`` and ``methods.csv`` that ``cmmerge report`` wrote for each study, so no number of it
is copied by hand.

    python scripts/claims_table.py "SentiMix Hinglish=docs/results/seeds5" \
        "SentiMix Spanglish=docs/results/en-es-balanced" ...

Each cell is the difference in test macro-F1 points (mean of the per-seed differences) with the
paired test's p over seeds; in brackets the two-level bootstrap's where the two fall on different
sides of 0.05; bold where both are below 0.05. Rows are the chosen λ of each merge method, the
configuration's own variant (``configured``), on the training task's test set and then on each
transfer task.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

ALPHA = 0.05
CLAIMS = (  # (row label, arm, reference column suffix)
    ("TV->FT beats Full FT", "TV->FT", "full_ft"),
    ("TIES->FT beats Full FT", "TIES->FT", "full_ft"),
    ("TV->FT beats CPT->FT", "TV->FT", "cpt_ft"),
    ("TIES->FT beats CPT->FT", "TIES->FT", "cpt_ft"),
    ("CPT->FT beats Full FT", "CPT->FT", "full_ft"),
)


def _p(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def cell(diff: float, p: float, p_boot: float) -> str:
    """``+1.5 (p = 0.50)``, the bootstrap's p in brackets where it falls on the other side of
    :data:`ALPHA`, bold where both are below it (``: the reverse`` when the difference is
    negative)."""
    text = f"{100 * diff:+.1f} (p = {_p(p)}"
    text += f" [{_p(p_boot)}])" if (p < ALPHA) != (p_boot < ALPHA) else ")"
    if p < ALPHA and p_boot < ALPHA:
        return f"**{text}**" + (": the reverse" if diff < 0 else "")
    return text


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _base(arm: str) -> str:
    """``TV->FT (LoRA) (lambda=0.5)`` -> ``TV->FT``."""
    return arm.split(" (")[0].split(" [")[0]


def study_cells(folder: Path) -> dict[str, str]:
    """``{row label: cell}`` of one study's ``study.csv`` and ``methods.csv``."""
    rows = [
        r
        for r in _read(folder / "study.csv")
        if r["configured"] != "False" and r["lambda_chosen"] != "False"
    ]
    out: dict[str, str] = {}
    for row in rows:
        transfer = row["test_task"] != row["train_task"]
        for label, arm, ref in CLAIMS:
            if _base(row["arm"]) != arm or not row.get(f"seed_diffs_vs_{ref}"):
                continue
            if transfer and ref != "full_ft":
                continue
            diffs = [float(d) for d in row[f"seed_diffs_vs_{ref}"].split()]
            name = f"{label}, tested on {row['test_task']}" if transfer else label
            out[name] = cell(
                sum(diffs) / len(diffs),
                float(row[f"seed_p_vs_{ref}"]),
                float(row[f"seed_boot_p_vs_{ref}"]),
            )
    for row in _read(folder / "methods.csv"):
        if row["test_task"] != row["train_task"]:
            continue
        diff = float(row["difference"])
        lead = _base(row["arm"]) if diff > 0 else _base(row["versus"])
        text = cell(abs(diff), float(row["seed_p"]), float(row["seed_boot_p"]))
        out["TV->FT vs TIES->FT"] = f"{lead.removesuffix('->FT')} {text}"
    return out


def table(studies: list[tuple[str, Path]]) -> str:
    """The Markdown table: one row per claim that some study has, one column per study."""
    cells = [study_cells(folder) for _, folder in studies]
    order = [label for label, _, _ in CLAIMS] + ["TV->FT vs TIES->FT"]
    rank = {label: i for i, label in enumerate(order)}
    extra = sorted(
        {k for c in cells for k in c} - set(order), key=lambda k: (rank[k.split(", ")[0]], k)
    )
    lines = [
        "| claim of the paper | " + " | ".join(name for name, _ in studies) + " |",
        "|---|" + "---|" * len(studies),
    ]
    for label in order + extra:
        if any(label in c for c in cells):
            lines.append(f"| {label} | " + " | ".join(c.get(label, "") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", help="NAME=DIR with DIR/study.csv")
    args = parser.parse_args(argv)
    studies = []
    for item in args.studies:
        name, sep, folder = item.rpartition("=")
        if not sep or not (Path(folder) / "study.csv").exists():
            parser.error(f"{item}: give NAME=DIR, DIR holding the report's study.csv")
        studies.append((name, Path(folder)))
    print(table(studies), end="")


if __name__ == "__main__":
    main()
