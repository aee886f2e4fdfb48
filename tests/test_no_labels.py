"""No code-mixed labels (issue 14): the base fine-tuned on English labels plus lambda * tau_cpt
(`cmmerge graft`), scored on the code-mixed task without further training, against Full FT and
CPT->FT on English and the arms trained on code-mixed labels; `cmmerge pipeline
experiment=no-labels` end to end on the tiny encoder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, xlmr_pair
from safetensors.torch import load_file

from cmmerge.commands import evaluate, finetune, graft, pipeline, status
from cmmerge.config import plan
from cmmerge.config.ids import stage_dirs
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import read_manifest
from cmmerge.merging.extract import extract_task_vector
from cmmerge.stages.graft import graft_weights

TASK, ENGLISH = "sentiment-en-hi", "english-sentiment-en-hi"
LAMBDAS = [0.5, 1.0]


def _classifier(pair: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A "fine-tuned" classifier: the base's backbone perturbed, with a 3-way head."""
    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(1)
    model = XLMRobertaForSequenceClassification.from_pretrained(pair / "base", num_labels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    model.to(dtype).save_pretrained(pair / "ft")
    return pair / "ft"


@pytest.mark.parametrize("scale", [0.5, -1.0])
def test_graft_adds_lambda_tau_to_covered_tensors_and_keeps_the_head(tmp_path, scale):
    pair = xlmr_pair(tmp_path)
    tau_file = tmp_path / "tau.safetensors"
    extract_task_vector(pair / "base", pair / "tuned", tau_file)
    ft = _classifier(pair)
    stats = graft_weights(ft, tau_file, scale, tmp_path / "out")
    tau, before = load_file(tau_file), load_file(ft / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before)
    covered = 0
    for key, value in before.items():
        name = key.removeprefix("roberta.")
        assert after[key].dtype == value.dtype == torch.float32  # the fine-tuned model's dtype
        if key.startswith("roberta.") and name in tau:
            covered += 1
            torch.testing.assert_close(after[key], value + scale * tau[name], rtol=0, atol=1e-6)
        else:  # the classifier head (and anything tau lacks): exactly the fine-tuned model's
            assert key.startswith("classifier."), key
            assert torch.equal(after[key], value), key
    assert covered == stats["n_merged"] == len(tau)
    assert sorted(stats["heads_copied"] + stats["base_only"]) == sorted(
        k for k in before if k.startswith("classifier.")
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cheaper = ["pipeline.merges=[{method:task_arithmetic,lambda:0.5}]", "data.token_lengths=false"]
    cfg = compose("pipeline", ["experiment=no-labels", f"run.root={root}", *FAST, *cheaper])
    pipeline.run(cfg)
    return cfg, root / "no-labels"


def _graft_cfg(cfg, scale: float, seed: int = 0):
    return pipeline.with_values(
        cfg, init="graft", onto=ENGLISH, method="task_arithmetic", seed=seed, **{"lambda": scale}
    )


def test_the_plan_has_every_arm_of_the_comparison():
    cfg = compose("pipeline", ["experiment=no-labels", "run.root=/nonexistent"])
    steps = plan.expand(cfg)
    grafts = [s for s in steps if s.stage == "graft"]
    assert sorted(float(s.cfg["lambda"]) for s in grafts) == LAMBDAS
    tuned = {(str(s.cfg.init), str(s.cfg.task.name)) for s in steps if s.stage == "finetune"}
    assert tuned == {
        ("base", TASK), ("cpt", TASK), ("merged", TASK), ("base", ENGLISH), ("cpt", ENGLISH)
    }  # fmt: skip
    english = [s for s in steps if s.stage == "evaluate" and "english" in s.folder.parent.name]
    assert english and all(s.eval_task == TASK for s in english)  # scored on code-mixed test
    for g in grafts:  # the English fine-tune and the task vector come first
        assert {p.parent.name for p in g.needs} == {"finetune", "extract"}


def test_finetune_overrides_of_an_entry_reach_the_labelled_fine_tunes_and_grafts_only():
    spec = "pipeline.no_labels=[{onto:english-sentiment-en-hi,lambda:[0.5],finetune:{epochs:7}}]"
    base = compose("pipeline", ["experiment=no-labels", "run.root=/nonexistent"])
    cfg = compose("pipeline", ["experiment=no-labels", "run.root=/nonexistent", spec])
    steps = plan.expand(cfg)
    for s in steps:
        if s.stage in ("finetune", "graft"):
            english = s.stage == "graft" or str(s.cfg.task.name) == ENGLISH
            assert s.cfg.finetune.epochs == (7 if english else base.finetune.epochs), s.folder
    graft = next(s for s in steps if s.stage == "graft")
    source = next(p for p in graft.needs if p.parent.name == "finetune")
    made = {s.folder for s in steps if s.stage == "finetune"}
    assert source in made and source not in {s.folder for s in plan.expand(base)}
    ceiling = {s.folder for s in steps if s.stage == "finetune" and s.cfg.task.name == TASK}
    assert ceiling <= {s.folder for s in plan.expand(base)}  # the ceiling arms are unchanged
    typo = spec.replace("epochs", "epoch")
    bad = compose("pipeline", ["experiment=no-labels", "run.root=/nonexistent", typo])
    with pytest.raises(CmmergeError, match="finetune.epoch is not a finetune setting"):
        plan.expand(bad)


def test_a_task_with_other_labels_is_refused_in_the_plan():
    spec = "pipeline.no_labels=[{onto:english-sentiment-en-hi,lambda:[0.5]}]"
    cfg = compose("pipeline", ["experiment=paper-xlmr", "run.root=/nonexistent", spec])
    with pytest.raises(CmmergeError, match="hate-en-hi .*no_labels: \\[\\]"):
        plan.expand(cfg)


def test_the_pipeline_reports_every_arm_with_lambda_chosen_on_validation(study):
    cfg, run = study
    rows = list(csv.DictReader(open(run / "report" / "study.csv", encoding="utf-8")))
    on_task = {r["arm"]: r for r in rows if r["test_task"] == TASK}
    arms = {a.split(" (lambda")[0] for a in on_task}
    assert {
        "English FT + τ_cpt", "Full FT (English labels)", "CPT->FT (English labels)",
        "Full FT", "CPT->FT", "TV->FT",
    } <= arms  # fmt: skip
    for row in on_task.values():
        assert 0.0 <= float(row["test_macro_f1_mean"]) <= 1.0
    english = [r for r in on_task.values() if "English labels" in r["arm"]]
    assert {r["train_task"] for r in english} == {ENGLISH}  # a transfer cell
    # lambda of the graft: the argmax of mean validation macro-F1 read from the metrics files
    val = {}
    for scale in LAMBDAS:
        folder = stage_dirs(_graft_cfg(cfg, scale))["finetune"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["split"] == "validation"
        val[scale] = metrics["macro_f1"]
        assert read_manifest(folder)["task"] == TASK
    best = max(LAMBDAS, key=lambda s: (val[s], -s))
    chosen = [r for r in rows if r["arm"].startswith("English FT") and r["lambda_chosen"] == "True"]
    assert [float(r["lambda"]) for r in chosen] == [best]
    selection = read_manifest(run / "report")["lambda_selection"]
    (graft_choice,) = [v for k, v in selection.items() if "+base-english" in k]
    assert graft_choice["lambda"] == best
    assert {c["lambda"]: c["val"] for c in graft_choice["candidates"]} == pytest.approx(val)
    text = (run / "report" / "report.md").read_text(encoding="utf-8")
    section = text.split("## No code-mixed labels", 1)[1]
    for label in ("English FT + τ_cpt", "Full FT (English labels)", "CPT->FT (English labels)"):
        assert f"| {label} |" in section
    assert "(ceiling)" in section and "Every λ" in section
    assert r"$\tau$" in (run / "report" / "study.tex").read_text(encoding="utf-8")


def test_the_graft_is_a_transaction_read_by_evaluate(study):
    cfg, run = study
    gcfg = _graft_cfg(cfg, 0.5)
    again = graft.run(gcfg)
    assert again["skipped"] is True
    folder = stage_dirs(gcfg)["finetune"]
    made = read_manifest(folder)
    assert made["stage"] == "graft" and made["init"] == "graft" and made["onto"] == ENGLISH
    assert folder.name.startswith("task_arithmetic-l0.5@") and folder.name.endswith(f"{TASK}-s0")
    # another lambda: a new folder; the first one is left as it was
    other = _graft_cfg(cfg, 0.25)
    made_other = graft.run(other)
    assert made_other["skipped"] is False
    assert stage_dirs(other)["finetune"] != folder
    assert read_manifest(folder)["fingerprint"] == made["fingerprint"]
    result = evaluate.run(pipeline.with_values(other, eval_tasks=[TASK]))
    assert 0.0 <= result[TASK]["macro_f1"] <= 1.0
    evaluated = read_manifest(stage_dirs(other)["evaluate"] / TASK)
    assert evaluated["finetune_id"] == stage_dirs(other)["finetune"].name
    with pytest.raises(CmmergeError, match="cmmerge graft"):
        finetune.run(other)
    # status lists the grafts, and names the command of one still to make
    rows = status.run(_graft_cfg(cfg, 0.7))["rows"]
    states = {r["stage"]: r for r in rows}
    assert states[f"finetune/{folder.name}"]["state"] == "finished"
    missing = [r for r in rows if r["state"] == "missing"]
    assert [r["command"].split()[1] for r in missing] == ["graft", "evaluate"]
    assert "init=graft" in missing[1]["command"] and "lambda=0.7" in missing[0]["command"]


def test_a_graft_names_what_it_needs(tmp_path):
    cfg = compose("graft", [f"run.root={tmp_path}", "run.name=x", "lambda=0.5", *FAST])
    with pytest.raises(CmmergeError) as err:
        graft.run(cfg)
    text = str(err.value)
    assert "graft needs cpt, extract, finetune" in text
    assert f"init=base task={ENGLISH}" in text
    wrong = compose("graft", [f"run.root={tmp_path}", "onto=hate-en-hi", *FAST])
    with pytest.raises(CmmergeError, match="labels"):
        graft.run(wrong)


@pytest.mark.parametrize("layout", ["Llama-3.2-1B", "Llama-3.1-8B"])
def test_graft_onto_a_decoder_classifier_moves_the_backbone_only(tmp_path, layout):
    """A decoder's tau_cpt (tied bfloat16 without lm_head.weight, or untied and sharded) added
    to a LlamaForSequenceClassification: its backbone moves by lambda * tau, its score head and
    dtype stay, and no LM head leaks into the classifier."""
    import zoo
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    base = zoo.make(layout, tmp_path)
    tuned = zoo.perturbed(base, tmp_path / "cpt", seed=3)
    tau_file = tmp_path / "tau.safetensors"
    extract_task_vector(base, tuned, tau_file)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    model.config.pad_token_id = 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "ft")
    stats = graft_weights(tmp_path / "ft", tau_file, 0.5, tmp_path / "out")
    tau = load_file(tau_file)
    before = load_file(tmp_path / "ft" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before) and not any(k.startswith("lm_head") for k in after)
    moved = 0
    for key, value in before.items():
        name = key.removeprefix("model.")
        assert after[key].dtype == torch.float32
        if name in tau:
            moved += 1
            torch.testing.assert_close(after[key], value + 0.5 * tau[name], rtol=0, atol=1e-6)
        else:
            assert key == "score.weight", key
            assert torch.equal(after[key], value)
    assert moved == stats["n_merged"] == len(before) - 1 > 10
    (tmp_path / "ft" / "config.json").replace(tmp_path / "out" / "config.json")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert loaded.config.num_labels == 3
