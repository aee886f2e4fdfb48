"""Disk and time: weights pruned after use (the stage stays finished for the report and for the
stages made from it), pruned stages made again when needed, keep_merged / keep_models, the
plan printed before a study, report_to refused in one line when missing, and CPT's held-out
evaluation on the fast loss without gathering logits."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import compose
from omegaconf import OmegaConf
from test_cpt_training import PARAMS, TEXTS
from test_tiny import ARCH

from cmmerge.commands import pipeline
from cmmerge.config import plan
from cmmerge.config.values import run_context
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import read_manifest
from cmmerge.models.tiny import build_tiny_model
from cmmerge.stages.runner import run_transaction, stage_input
from cmmerge.training import cpt as cpt_training
from cmmerge.training.arguments import INTEGRATIONS, training_arguments


def _cfg(tmp_path):
    return OmegaConf.create({"run": {"root": str(tmp_path), "name": "r"}, "force": False})


def _model_stage(tmp_path, name="m", calls=None):
    """A finished stage with weights in model/ and a metrics file."""

    def work(d):
        if calls is not None:
            calls.append(1)
        (d / "model").mkdir()
        (d / "model" / "model.safetensors").write_bytes(b"w" * 1000)
        (d / "model" / "config.json").write_text("{}")
        (d / "metrics.json").write_text('{"macro_f1": 0.5}')
        return {"outputs": ["model/", "metrics.json"]}

    stage = tmp_path / "r" / name
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], work)
    return stage, work


def test_pruned_weights_leave_a_finished_stage_and_fresh_downstream_records(tmp_path):
    stage, work = _model_stage(tmp_path)
    manifest_bytes = (stage / "manifest.json").read_bytes()
    recorded = stage_input(stage, "hint")  # what a downstream stage records of it

    assert transaction.prune(stage, ["model/"]) == 1002  # weights and config, in bytes
    assert not (stage / "model").exists() and (stage / "metrics.json").is_file()
    assert transaction.pruned(stage) == ["model/"]
    assert json.loads((stage / "pruned.json").read_text())["bytes"] == 1002
    # the stage is still finished, its manifest untouched: stages made from it stay fresh
    assert (stage / "manifest.json").read_bytes() == manifest_bytes
    assert transaction.problem(stage) is None and transaction.finished_manifest(stage)
    assert stage_input(stage, "hint") == recorded
    # re-running the same stage skips it (the report still counts it)
    calls: list = []
    again = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], lambda d: calls.append(d)
    )
    assert again["skipped"] and not calls
    assert transaction.prune(stage, ["model/"]) == 0  # nothing left to delete


def test_a_pruned_merge_of_a_pruned_merge_made_again_keeps_its_users_fresh(tmp_path):
    """Two deterministic stages in a chain, both pruned and made again (the pipeline forces
    them): each stands for the version it replaces, so a stage made from the second stays
    fresh."""
    _, work = _model_stage(tmp_path, "unused")
    forced = OmegaConf.merge(_cfg(tmp_path), {"force": True})
    up, down, user = (tmp_path / "r" / name for name in ("up", "down", "user"))
    run_transaction(run_context(_cfg(tmp_path)), "merge", up, {"a": 1}, [], work)
    run_transaction(
        run_context(_cfg(tmp_path)), "merge", down, {"b": 1}, [stage_input(up, "h")], work
    )
    first = stage_input(down, "h")["manifest_sha256"]
    run_transaction(
        run_context(_cfg(tmp_path)), "s", user, {"c": 1}, [stage_input(down, "h")], work
    )
    for stage in (up, down):
        transaction.prune(stage, ["model/"])
    run_transaction(run_context(forced), "merge", up, {"a": 1}, [], work)
    again = run_transaction(
        run_context(forced), "merge", down, {"b": 1}, [stage_input(up, "h")], work
    )
    assert again["same_as"] == [first]
    assert transaction.stale_inputs(read_manifest(user)) == []


def test_a_missing_file_that_was_not_pruned_is_still_a_damaged_stage(tmp_path):
    stage, _ = _model_stage(tmp_path)
    transaction.prune(stage, ["model/"])
    (stage / "metrics.json").unlink()
    assert transaction.problem(stage) == "metrics.json is missing"
    # a record that names other outputs excuses nothing else
    other, _ = _model_stage(tmp_path, "o")
    (other / "pruned.json").write_text(json.dumps({"pruned": ["adapter/"]}))
    (other / "model" / "model.safetensors").unlink()
    assert transaction.problem(other) == "model/model.safetensors is missing"


def test_loading_a_pruned_model_says_how_to_make_it_again(tmp_path):
    from cmmerge.models.loading import load_tokenizer

    stage, _ = _model_stage(tmp_path)
    transaction.prune(stage, ["model/"])
    with pytest.raises(CmmergeError, match="deleted after use .*force=true"):
        load_tokenizer(stage / "model")


def test_only_finished_stages_are_pruned_and_keep_settings_win(tmp_path):
    unfinished = tmp_path / "r" / "u"
    (unfinished / "model").mkdir(parents=True)
    assert transaction.prune(unfinished, ["model/"]) == 0
    assert (unfinished / "model").is_dir() and not (unfinished / "pruned.json").exists()

    stage, _ = _model_stage(tmp_path)
    keep = OmegaConf.create({"keep_merged": True, "keep_models": False})
    assert pipeline.prune(keep, "merge", stage) == 0 and (stage / "model").is_dir()
    assert pipeline.prune(keep, "finetune", stage) == 1002 and not (stage / "model").exists()
    assert compose("pipeline").keep_merged is False and compose("pipeline").keep_models is True


def _three_label_task(folder):
    """A separable negative / neutral / positive task (the labels of sentiment-en-ta, so a
    model trained on it is evaluated there too: transfer)."""
    import csv
    import random

    words = {
        "negative": ["bakwas", "bura", "hate", "ghatiya", "worst"],
        "neutral": ["theek", "okay", "chalo", "fine", "normal"],
        "positive": ["accha", "badhiya", "love", "mast", "best"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    out = ["task=custom", "task.labels=[negative,neutral,positive]"]
    for split, n, seed in (("train", 60, 0), ("validation", 30, 1), ("test", 30, 2)):
        rng = random.Random(seed)
        path = folder / f"{split}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                label = list(words)[i % 3]
                writer.writerow([" ".join(rng.sample(words[label], 3)), label])
        out.append(f"task.{split}={path}")
    return out


STUDY = [
    "train=smoke",
    "cpt.max_steps=4",
    "cpt.batch_size=16",
    "cpt.max_length=32",
    "finetune.epochs=2",
    "finetune.batch_size=8",
    "finetune.max_length=32",
    "evaluate.max_length=32",
    "data.leakage_tasks=[]",
    "data.token_lengths=false",
    "pipeline.baselines=[base]",
    "pipeline.merges=[{method: task_arithmetic, lambda: [0.5, 1.0]}]",
    "pipeline.seeds=[0, 1]",
    "eval_tasks=[custom, sentiment-en-ta]",
    "keep_models=false",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    overrides = [f"run.root={root}", "run.name=st", *_three_label_task(root / "task"), *STUDY]
    cfg = compose("pipeline", overrides)
    pipeline.run(cfg)
    return cfg, root / "st", overrides


def test_a_study_prunes_every_merge_and_model_after_use_and_reports_all(study, capsys):
    cfg, run, _ = study
    steps = plan.expand(cfg)
    count = {s: sum(1 for x in steps if x.stage == s) for s in ("merge", "finetune", "evaluate")}
    assert count == {"merge": 2, "finetune": 6, "evaluate": 12}  # 3 arms x 2 seeds x 2 tasks
    assert all(plan.is_done(s.folder) for s in steps)
    for s in steps:
        if s.stage in ("merge", "finetune"):
            assert not (s.folder / "model").exists() and transaction.pruned(s.folder), s.folder
    assert all((s.folder / "predictions.jsonl").is_file() for s in steps if s.stage == "evaluate")
    rows = (run / "report" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and "test_macro_f1[sentiment-en-ta]" in rows[0]
    assert read_manifest(run / "cpt" / plan.stage_dirs(cfg)["cpt"].name)["status"] == "finished"


def test_the_plan_printed_again_is_all_done_with_measured_times(study, capsys):
    cfg, run, _ = study
    before = {p: p.read_bytes() for p in run.glob("*/**/manifest.json")}
    pipeline.run(cfg)  # resumes: nothing to do
    assert {p: p.read_bytes() for p in run.glob("*/**/manifest.json")} == before
    text = capsys.readouterr().out
    n = len(plan.expand(cfg))  # data, cpt, extract, 2 merges, 6 fine-tunes, 12 evaluations, report
    assert n == 24 and f"plan for {run}: {n} stages, {n} done, 0 to do" in text
    assert "  finetune       0      6" in text


def test_a_new_seed_makes_a_pruned_merge_again_and_the_plan_estimates_it(study, capsys):
    cfg, run, overrides = study
    more = compose("pipeline", [*overrides, "pipeline.seeds=[0, 1, 2]", "pipeline.dry_run=true"])
    pipeline.run(more)
    text = capsys.readouterr().out
    # seed 2 needs both pruned merges: made again (a merge is deterministic: the same version),
    # they leave the fine-tunes of seeds 0 and 1 made from them done
    assert "33 stages, 21 done, 12 to do" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:9]}
    assert lines["merge"][1:3] == ["2", "0"] and lines["finetune"][1:3] == ["3", "6"]
    assert lines["evaluate"][1:3] == ["6", "12"] and lines["finetune"][3][0].isdigit()
    assert "time to do: about" in text and "measured wall times" in text

    earlier = {p: p.read_bytes() for p in run.glob("finetune/*/manifest.json")}
    # seeds 0 and 1 are visited after their merges are made again: still the same versions
    one = compose("pipeline", [*overrides, "pipeline.seeds=[0, 1, 2]", "keep_merged=true"])
    pipeline.run(one)
    assert "finetune: redoing" not in capsys.readouterr().err
    merges = [s for s in plan.expand(one) if s.stage == "merge"]
    for merge_dir in (s.folder for s in merges):  # made again for seed 2, kept this time
        assert (merge_dir / "model").is_dir() and not transaction.pruned(merge_dir)
        assert len(read_manifest(merge_dir)["same_as"]) == 1  # stands for the pruned version
    # the earlier seeds' fine-tunes of those merges were not redone and are not stale
    assert all(p.read_bytes() == data for p, data in earlier.items())
    assert "stale" not in (run / "report" / "report.csv").read_text()


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_report_to_an_integration_that_is_missing_is_one_line(tmp_path, name):
    installed = any(importlib.util.find_spec(m) for m in INTEGRATIONS[name])
    params = {**PARAMS, "report_to": name}
    if installed:
        args = training_arguments(tmp_path / "checkpoints", params, 0)
        assert args.report_to == [name]
        if name == "tensorboard":
            assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
        return
    with pytest.raises(CmmergeError) as err:
        training_arguments(tmp_path / "checkpoints", params, 0)
    assert str(err.value) == (
        f"report_to={name}: {name} is not installed (pip install {name}); or report_to=none"
    )
    with pytest.raises(CmmergeError, match="choose none, tensorboard, wandb"):
        training_arguments(tmp_path, {**PARAMS, "report_to": "mlflw"}, 0)
    assert training_arguments(tmp_path, {**PARAMS, "report_to": "none"}, 0).report_to == []
    for stage in ("cpt", "finetune"):
        assert compose("pipeline")[stage].report_to == "none"


def test_cpt_heldout_evaluation_uses_the_fast_loss_and_gathers_no_logits(tmp_path, monkeypatch):
    seen: list[tuple[bool, object]] = []
    fast_calls: list[int] = []
    step = cpt_training.CptTrainer.prediction_step
    fast = cpt_training.masked_lm_loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        out = step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        seen.append((prediction_loss_only, out[1]))
        return out

    def masked_lm_loss(*args, **kwargs):
        fast_calls.append(1)
        return fast(*args, **kwargs)

    monkeypatch.setattr(cpt_training.CptTrainer, "prediction_step", prediction_step)
    monkeypatch.setattr(cpt_training, "masked_lm_loss", masked_lm_loss)
    base = build_tiny_model("xlmr", ARCH, TEXTS, tmp_path / "base", seed=0)
    params = {**PARAMS, "max_steps": 1, "eval_fraction": 0.1, "batch_size": 8}
    metrics = cpt_training.train_lm(base, "encoder", TEXTS, params, tmp_path / "out", seed=0)
    heldout = len(TEXTS) // 10
    assert metrics["heldout_texts"] == heldout
    batches = 2 * -(-heldout // 8)  # before and after training, batches of 8
    assert len(seen) == batches and all(only and logits is None for only, logits in seen)
    assert len(fast_calls) == batches + 1  # every held-out batch, and the one training step
