"""Check that a run directory reproduces another: every evaluation both have, by test macro-F1
and the bytes of its predictions, and every CPT checkpoint and task vector both have, by hash.

    python scripts/compare_runs.py runs/replicate-cpu /elsewhere/runs/replicate-cpu

Exits 1 when anything both have differs (evaluations or weights only one of them has are
listed, not counted as differences).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compare(a: Path, b: Path) -> int:
    """Print one line per shared evaluation and weight file; return the number that differ."""
    differ = same = 0
    for metrics in sorted(b.glob("evaluate/*/*/metrics.json")):
        rel = metrics.relative_to(b)
        if not (a / rel).exists():
            print(f"only in {b}: {rel.parent}")
            continue
        x, y = json.loads((a / rel).read_text()), json.loads(metrics.read_text())
        preds = [p / rel.parent / "predictions.jsonl" for p in (a, b)]
        ok = x["macro_f1"] == y["macro_f1"] and _sha(preds[0]) == _sha(preds[1])
        same, differ = same + ok, differ + (not ok)
        scores = f"{x['macro_f1']:.4f} / {y['macro_f1']:.4f}"
        print(f"{'same' if ok else 'DIFFERENT'} {rel.parent}: {scores}")
    weights = [
        *b.glob("cpt/*/model/model.safetensors"),
        *b.glob("extract/*/task_vector.safetensors"),
    ]
    for path in sorted(weights):
        rel = path.relative_to(b)
        if (a / rel).exists():
            ok = _sha(a / rel) == _sha(path)
            same, differ = same + ok, differ + (not ok)
            print(f"{'same' if ok else 'DIFFERENT'} {rel}")
    print(f"{same} identical, {differ} different")
    return differ


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B")
    sys.exit(1 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 0)
