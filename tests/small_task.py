"""A small, separable custom task (CSV files) for fast fine-tuning tests."""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = {
    "neg": ["bakwas", "bura", "hate", "ghatiya", "worst"],
    "pos": ["accha", "badhiya", "love", "mast", "best"],
}


def rows(n: int, seed: int = 0, labels: tuple[str, ...] = ("neg", "pos")) -> list[tuple[str, str]]:
    """``n`` (text, label) rows, cycling through ``labels``; a text is 3 words of its label (of
    other labels: neutral words) and a number."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS.get(label, ["theek", "okay", "chalo", "fine"]), 3)
        out.append((f"{' '.join(words)} {rng.randint(0, 99)} yaar", label))
    return out


def write_csv(path: Path, data: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(data)
    return path


def small_task(folder: Path, n_train: int = 48, n_eval: int = 16) -> list[str]:
    """Write train / validation / test CSVs under ``folder``; the overrides that select them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train": rows(n_train, seed=0),
        "validation": rows(n_eval, seed=1),
        "test": rows(n_eval, seed=2),
    }
    out = ["task=custom", "task.labels=[neg,pos]"]
    for split, data in files.items():
        out.append(f"task.{split}={write_csv(folder / f'{split}.csv', data)}")
    return out
