"""A real pretrained model end to end: multilingual-e5-small (a bare ``BertModel``: keys without
the ``bert.`` prefix, no MLM head) through the paper's arms (Full FT, CPT->FT, TV->FT, TIES->FT)
with small budgets on a small, separable task.

The model folder is ``$CMMERGE_ME5`` (default ``~/.cache/cmmerge/me5-small``), built there with
``../shared/tools/me5_small/make_me5_small.sh`` when absent; the test is skipped, saying why,
only when it cannot be built. ``pytest -m slow tests/test_me5.py`` runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file
from small_task import small_task
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from cmmerge.commands import pipeline
from cmmerge.io.manifest import read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO.parent / "shared" / "tools" / "me5_small" / "make_me5_small.sh"
LAMBDA_TV, LAMBDA_TIES, DENSITY = 0.5, 1.0, 0.2

BUDGET = [  # small: every step updates 118M parameters (a 250k-row embedding) on the CPU
    "cpt.max_steps=10",
    "cpt.batch_size=16",
    "cpt.max_length=32",
    "cpt.lr=5e-5",
    "cpt.save_steps=0",
    "cpt.eval_fraction=0.01",
    "cpt.logging_steps=5",
    "finetune.epochs=2",
    "finetune.batch_size=16",
    "finetune.max_length=32",
    "finetune.lr=1e-4",
    "finetune.warmup=0.1",
    "finetune.logging_steps=4",
    "evaluate.max_length=32",
    "data.token_lengths=false",
]


@pytest.fixture(scope="module")
def me5() -> Path:
    """The multilingual-e5-small folder, built with the shared script when absent."""
    folder = Path(
        os.environ.get("CMMERGE_ME5") or Path.home() / ".cache" / "cmmerge" / "me5-small"
    ).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if not SCRIPT.is_file():
        pytest.skip(f"no {folder} (set CMMERGE_ME5) and no {SCRIPT} to build it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".me5-", dir=folder.parent)) / "model"
    out = subprocess.run(
        ["bash", str(SCRIPT), str(building)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1800,
    )
    if out.returncode != 0 or not (building / "config.json").is_file():
        shutil.rmtree(building.parent, ignore_errors=True)
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot build multilingual-e5-small offline with {SCRIPT}: {why}")
    building.rename(folder)
    shutil.rmtree(building.parent, ignore_errors=True)
    return folder


def _stages(run: Path, stage: str) -> dict[Path, dict]:
    """Finished folders of ``stage`` in the run and their manifests."""
    found = {}
    for manifest in run.rglob("manifest.json"):
        data = read_manifest(manifest.parent)
        if data and data.get("stage") == stage:
            found[manifest.parent] = data
    return found


def _backbone(folder: Path) -> dict[str, torch.Tensor]:
    """Float tensors of a model folder keyed without the ``bert.`` prefix, heads left out."""
    tensors = load_file(str(folder / "model.safetensors"))
    return {
        k.removeprefix("bert."): v
        for k, v in tensors.items()
        if v.is_floating_point() and not k.startswith(("cls.", "classifier."))
    }


def _majority_macro_f1(per_class: dict) -> float:
    """Macro-F1 of always predicting the most frequent class."""
    support = [entry["support"] for entry in per_class.values()]
    share = max(support) / sum(support)
    return 2 * share / (1 + share) / len(support)


def test_me5_small_through_the_paper_arms(me5, tmp_path):
    start = time.time()
    task = small_task(tmp_path / "task", n_train=64, n_eval=32)
    overrides = [
        "model=mbert",
        f"model.name_or_path={me5}",
        "model.name=me5-small",
        f"run.root={tmp_path}",
        "run.name=me5",
        "keep_merged=true",  # the merged checkpoints are checked below
        *task,
        *BUDGET,
        f"pipeline.merges=[{{method: task_arithmetic, lambda: {LAMBDA_TV}}},"
        f"{{method: ties, lambda: {LAMBDA_TIES}, density: {DENSITY}}}]",
    ]
    pipeline.run(compose("pipeline", overrides))
    run = tmp_path / "me5"

    (cpt_dir,) = _stages(run, "cpt")
    cpt_model = AutoModelForMaskedLM.from_pretrained(cpt_dir / "model")  # MLM head added by CPT
    assert (
        cpt_model.cls.predictions.decoder.weight is cpt_model.bert.embeddings.word_embeddings.weight
    )
    base, tuned = _backbone(me5), _backbone(cpt_dir / "model")
    assert base.keys() <= tuned.keys()
    tau = {k: tuned[k] - base[k] for k in base}
    assert sum(float(t.abs().sum()) for t in tau.values()) > 0  # CPT moved the weights

    merges = {m["config"]["method"]: folder for folder, m in _stages(run, "merge").items()}
    assert sorted(merges) == ["task_arithmetic", "ties"]
    for method, folder in merges.items():
        AutoModel.from_pretrained(folder / "model")
        merged = _backbone(folder / "model")
        kept = total = 0
        for key, theta in base.items():
            delta = merged[key] - theta
            if method == "task_arithmetic":  # theta + lambda * tau, everywhere
                torch.testing.assert_close(delta, LAMBDA_TV * tau[key], atol=2e-6, rtol=0)
            else:  # TIES, one source: each entry either the base's or base + lambda * tau
                moved = delta != 0
                torch.testing.assert_close(
                    delta[moved], LAMBDA_TIES * tau[key][moved], atol=2e-6, rtol=0
                )
                kept, total = kept + int(moved.sum()), total + delta.numel()
        if total:
            assert abs(kept / total - DENSITY) < 0.02, kept / total

    arms = _stages(run, "finetune")
    assert len(arms) == 4, sorted(arms)
    f1s = {}
    for folder, manifest in arms.items():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder / "model", output_loading_info=True
        )
        assert model.num_labels == 2 and not info["missing_keys"], info
        metrics = manifest["metrics"]  # validation: the epoch kept
        f1s[manifest["arm"]] = round(metrics["macro_f1"], 4)
        baseline = _majority_macro_f1(metrics["per_class"])
        assert metrics["macro_f1"] > baseline + 0.1, (folder.name, baseline, metrics)
    assert {arm.split(" (")[0] for arm in f1s} == {"Full FT", "CPT->FT", "TV->FT", "TIES->FT"}
    assert len(_stages(run, "evaluate")) == 4
    print(f"\nme5-small arms, validation macro-F1: {f1s}; wall time {time.time() - start:.0f} s")
