"""scripts/compare_runs.py: two run directories compared by evaluations and weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _run_dir(root: Path, f1: float, pred: str, weights: bytes) -> Path:
    ev = root / "evaluate" / "base-x-s0" / "x"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"macro_f1": f1}))
    (ev / "predictions.jsonl").write_text(json.dumps({"pred": pred}) + "\n")
    model = root / "cpt" / "en-hi" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(weights)
    return root


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=60
    )


def test_identical_runs_pass_and_any_difference_fails(tmp_path):
    a = _run_dir(tmp_path / "a", 0.5, "pos", b"w1")
    same = _run_dir(tmp_path / "b", 0.5, "pos", b"w1")
    out = _compare(a, same)
    assert out.returncode == 0 and "2 identical, 0 different" in out.stdout
    # same score, other predictions; and other weights: each counted
    other = _run_dir(tmp_path / "c", 0.5, "neg", b"w2")
    out = _compare(a, other)
    assert out.returncode == 1 and "0 identical, 2 different" in out.stdout
    assert "DIFFERENT evaluate/base-x-s0/x" in out.stdout
    assert "DIFFERENT cpt/en-hi/model/model.safetensors" in out.stdout
