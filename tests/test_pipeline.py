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

from cmmerge.commands import extract, merge, pipeline
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import resolve_model
from cmmerge.io.manifest import read_manifest

# The demo's arms, as pipeline.run makes them from its config.
ARMS = {
    "base": {"init": "base"},
    "cpt": {"init": "cpt"},
    "task_arithmetic-l0.5": {"init": "merged", "method": "task_arithmetic", "lambda": 0.5},
    "ties-l1-d0.2": {"init": "merged", "method": "ties", "lambda": 1.0, "density": 0.2},
}


def arm_dirs(cfg, arm: str) -> dict[str, Path]:
    """Every stage folder of one of the demo's arms."""
    return stage_dirs(pipeline.with_values(cfg, **ARMS[arm]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = compose("pipeline", ["experiment=demo", f"run.root={root}", *FAST])
    pipeline.run(cfg)
    return cfg, root / "demo"


def _stage_dirs(cfg) -> list[Path]:
    common = stage_dirs(cfg)
    dirs = [common[k] for k in ("data", "cpt", "extract", "report")]
    dirs += [arm_dirs(cfg, m)["merge"] for m in ("task_arithmetic-l0.5", "ties-l1-d0.2")]
    for arm in ARMS:
        d = arm_dirs(cfg, arm)
        dirs += [d["finetune"], d["evaluate"] / "sentiment-en-hi"]
    return dirs


def test_stage_folders_are_named_by_their_specs(demo):
    cfg, run = demo
    cpt_id = stage_dirs(cfg)["cpt"].name
    assert cpt_id.startswith("en-hi-")  # FAST's CPT settings differ from the smoke preset
    assert arm_dirs(cfg, "ties-l1-d0.2")["merge"].name == f"ties-l1-d0.2@{cpt_id}"
    ft = arm_dirs(cfg, "cpt")["finetune"].name
    assert ft.startswith(f"cpt@{cpt_id}-sentiment-en-hi-") and ft.endswith("-s0")
    assert [p.name for p in (run / "cpt").iterdir() if not p.name.startswith(".")] == [cpt_id]


def test_every_stage_has_a_complete_manifest(demo):
    cfg, run = demo
    for stage_dir in _stage_dirs(cfg):
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
    cfg, run = demo
    cpt = stage_dirs(cfg)["cpt"]
    metrics = json.loads((cpt / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert metrics["perplexity"] < metrics["perplexity_before"]
    model = AutoModelForMaskedLM.from_pretrained(cpt / "model")
    assert model.config.model_type == "xlm-roberta"
    assert "Continued pre-training" in (cpt / "model" / "README.md").read_text()


def test_task_vector_is_cpt_minus_base_over_the_backbone(demo):
    cfg, run = demo
    dirs = stage_dirs(cfg)
    tau = load_file(dirs["extract"] / "task_vector.safetensors")
    base = load_file(resolve_model(cfg) / "model.safetensors")
    tuned = load_file(dirs["cpt"] / "model" / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert key in tau and not any(k.startswith(("roberta.", "lm_head")) for k in tau)
    torch.testing.assert_close(tau[key], tuned["roberta." + key] - base["roberta." + key])
    stats = json.loads((dirs["extract"] / "stats.json").read_text())
    assert stats["n_params"] == sum(t.numel() for t in tau.values())


def test_merges_follow_the_formulas(demo):
    cfg, run = demo
    tau = load_file(stage_dirs(cfg)["extract"] / "task_vector.safetensors")
    base = load_file(resolve_model(cfg) / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    tv_dir, ties_dir = (arm_dirs(cfg, m)["merge"] for m in ("task_arithmetic-l0.5", "ties-l1-d0.2"))
    tv = load_file(tv_dir / "model" / "model.safetensors")
    torch.testing.assert_close(tv["roberta." + key], base["roberta." + key] + 0.5 * tau[key])
    torch.testing.assert_close(tv["lm_head.dense.weight"], base["lm_head.dense.weight"])
    ties = load_file(ties_dir / "model" / "model.safetensors")
    changed = (ties["roberta." + key] != base["roberta." + key]).float().mean().item()
    assert 0.15 < changed <= 0.2 + 1e-6  # top 20% by magnitude kept
    for merge_dir in (tv_dir, ties_dir):
        folder = merge_dir / "model"
        assert AutoModelForMaskedLM.from_pretrained(folder).config.vocab_size > 0
        assert (folder / "README.md").exists() and (folder / "merge.yaml").exists()
        assert (folder / "tokenizer.json").exists()


def test_finetune_and_evaluate_metrics_are_consistent(demo):
    cfg, run = demo
    for arm in ARMS:
        ft = json.loads((arm_dirs(cfg, arm)["finetune"] / "metrics.json").read_text())
        assert ft["split"] == "validation" and 0.0 <= ft["macro_f1"] <= 1.0
        assert sum(map(sum, ft["confusion_matrix"]["matrix"])) == 300
        ev_dir = arm_dirs(cfg, arm)["evaluate"] / "sentiment-en-hi"
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
    before = {d: (d / "manifest.json").read_bytes() for d in _stage_dirs(cfg)}
    pipeline.run(cfg)
    assert all((d / "manifest.json").read_bytes() == b for d, b in before.items())

    forced = cfg.copy()
    forced.force = True
    assert extract.run(forced)["skipped"] is False
    merge_cfg = pipeline.with_values(cfg, method="ties", init="merged", **{"lambda": 1.0})
    # the task vector's manifest changed, so the merge that read it is redone
    assert merge.run(merge_cfg)["skipped"] is False
