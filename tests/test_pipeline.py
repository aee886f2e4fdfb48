"""The demo pipeline end to end on the tiny encoder: every stage's files, values and skipping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose
from safetensors.torch import load_file
from sklearn.metrics import f1_score
from transformers import AutoModelForMaskedLM

from cmmerge.io.manifest import read_manifest
from cmmerge.models.loading import resolve_model
from cmmerge.stages import extract, merge, pipeline

ARMS = ["base", "cpt", "task_arithmetic-l0.5", "ties-l1-d0.2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = compose("pipeline", ["experiment=demo", f"run.root={root}", *FAST])
    pipeline.run(cfg)
    return cfg, root / "demo"


def _stage_dirs(run: Path) -> list[Path]:
    dirs = [run / "data", run / "cpt", run / "extract", run / "report"]
    dirs += [run / "merge" / m for m in ("task_arithmetic-l0.5", "ties-l1-d0.2")]
    for arm in ARMS:
        dirs += [
            run / "finetune" / f"{arm}-sentiment-en-hi-s0",
            run / "evaluate" / f"{arm}-sentiment-en-hi-s0" / "sentiment-en-hi",
        ]
    return dirs


def test_every_stage_has_a_complete_manifest(demo):
    _, run = demo
    for stage_dir in _stage_dirs(run):
        manifest = read_manifest(stage_dir)
        assert manifest is not None, stage_dir
        assert manifest["status"] == "finished"
        for key in (
            "config",
            "inputs",
            "outputs",
            "metrics",
            "versions",
            "wall_time_s",
            "peak_rss_mb",
            "fingerprint",
            "git_revision",
        ):
            assert key in manifest, (stage_dir, key)
        for item in manifest["inputs"]:
            assert item.get("manifest_sha256") or item.get("sha256")


def test_data_stats_count_the_samples(demo):
    _, run = demo
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["task"]["sizes"] == {"train": 1500, "validation": 300, "test": 300}
    dist = stats["task"]["label_distribution"]["test"]
    assert sum(dist.values()) == 300 and set(dist) == {"negative", "neutral", "positive"}
    corpus = stats["corpus"]
    assert (
        corpus["kept"]
        == corpus["raw"]
        - corpus["empty_removed"]
        - corpus["duplicates_removed"]
        - corpus["leakage_removed"]
    )
    assert corpus["kept"] > 3000


def test_cpt_lowers_heldout_perplexity_and_saves_a_masked_lm(demo):
    _, run = demo
    metrics = json.loads((run / "cpt" / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert metrics["perplexity"] < metrics["perplexity_before"]
    model = AutoModelForMaskedLM.from_pretrained(run / "cpt" / "model")
    assert model.config.model_type == "xlm-roberta"
    assert "Continued pre-training" in (run / "cpt" / "model" / "README.md").read_text()


def test_task_vector_is_cpt_minus_base_over_the_backbone(demo):
    cfg, run = demo
    tau = load_file(run / "extract" / "task_vector.safetensors")
    base = load_file(resolve_model(cfg) / "model.safetensors")
    tuned = load_file(run / "cpt" / "model" / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert key in tau and not any(k.startswith(("roberta.", "lm_head")) for k in tau)
    torch.testing.assert_close(tau[key], tuned["roberta." + key] - base["roberta." + key])
    stats = json.loads((run / "extract" / "stats.json").read_text())
    assert stats["n_params"] == sum(t.numel() for t in tau.values())


def test_merges_follow_the_formulas(demo):
    cfg, run = demo
    tau = load_file(run / "extract" / "task_vector.safetensors")
    base = load_file(resolve_model(cfg) / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    tv = load_file(run / "merge" / "task_arithmetic-l0.5" / "model" / "model.safetensors")
    torch.testing.assert_close(tv["roberta." + key], base["roberta." + key] + 0.5 * tau[key])
    torch.testing.assert_close(tv["lm_head.dense.weight"], base["lm_head.dense.weight"])
    ties = load_file(run / "merge" / "ties-l1-d0.2" / "model" / "model.safetensors")
    changed = (ties["roberta." + key] != base["roberta." + key]).float().mean().item()
    assert 0.15 < changed <= 0.2 + 1e-6  # top 20% by magnitude kept
    for merge_id in ("task_arithmetic-l0.5", "ties-l1-d0.2"):
        folder = run / "merge" / merge_id / "model"
        assert AutoModelForMaskedLM.from_pretrained(folder).config.vocab_size > 0
        assert (folder / "README.md").exists() and (folder / "merge.yaml").exists()
        assert (folder / "tokenizer.json").exists()


def test_finetune_and_evaluate_metrics_are_consistent(demo):
    _, run = demo
    for arm in ARMS:
        ft = json.loads(
            (run / "finetune" / f"{arm}-sentiment-en-hi-s0" / "metrics.json").read_text()
        )
        assert ft["split"] == "validation" and 0.0 <= ft["macro_f1"] <= 1.0
        assert sum(map(sum, ft["confusion_matrix"]["matrix"])) == 300
        ev_dir = run / "evaluate" / f"{arm}-sentiment-en-hi-s0" / "sentiment-en-hi"
        ev = json.loads((ev_dir / "metrics.json").read_text())
        keys = list(ev)
        assert keys[:4] == ["split", "macro_f1", "accuracy", "weighted_f1"]
        preds = [json.loads(line) for line in (ev_dir / "predictions.jsonl").open()]
        assert len(preds) == 300
        labels = ["negative", "neutral", "positive"]
        recomputed = f1_score(
            [p["gold"] for p in preds],
            [p["pred"] for p in preds],
            labels=labels,
            average="macro",
            zero_division=0,
        )
        assert recomputed == pytest.approx(ev["macro_f1"])
        assert all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)


def test_report_lists_the_paper_arms(demo):
    _, run = demo
    text = (run / "report" / "report.md").read_text()
    for arm in ("Full FT", "CPT->FT", "TV->FT", "TIES->FT"):
        assert arm in text
    rows = list(csv.DictReader((run / "report" / "report.csv").open()))
    assert len(rows) == 4 and all(0 <= float(r["test_macro_f1"]) <= 1 for r in rows)


def test_second_run_skips_everything_and_force_redoes(demo):
    cfg, run = demo
    before = {d: (d / "manifest.json").read_bytes() for d in _stage_dirs(run)}
    pipeline.run(cfg)
    assert all((d / "manifest.json").read_bytes() == b for d, b in before.items())

    forced = cfg.copy()
    forced.force = True
    assert extract.run(forced)["skipped"] is False
    merge_cfg = pipeline.with_values(cfg, method="ties", init="merged", **{"lambda": 1.0})
    # the task vector's manifest changed, so the merge that read it is redone
    assert merge.run(merge_cfg)["skipped"] is False
