"""The issues' acceptance runs on the tiny models: a user's own CSV/JSONL task, the decoder with
LoRA end to end, and the multi-source merge arm."""

from __future__ import annotations

import csv
import json
import random

from conftest import FAST, compose
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cmmerge.commands import cpt, evaluate, extract, finetune, merge, prompt, report
from cmmerge.config.ids import stage_dirs
from cmmerge.config.specs import PromptSpec
from cmmerge.io.manifest import read_manifest


def test_custom_csv_and_jsonl_with_other_column_names(tmp_path):
    rng = random.Random(0)
    words = {"pos": "accha badhiya love", "neg": "bakwas bura hate"}
    rows = [(f"{words[y]} {rng.randint(0, 9)} yaar", y) for y in ("pos", "neg") * 60]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tweet", "polarity"])
        writer.writerows(rows)
    with open(tmp_path / "test.jsonl", "w") as f:  # JSONL test file, same other column names
        for text, y in rows[:40]:
            f.write(json.dumps({"tweet": text, "polarity": y}) + "\n")
    common = [
        "task=custom",
        f"task.train={tmp_path / 'train.csv'}",
        f"task.test={tmp_path / 'test.jsonl'}",
        "task.text_column=tweet",
        "task.label_column=polarity",
        "task.labels=[neg,pos]",
        "init=base",
        f"run.root={tmp_path}",
        "run.name=c",
        *FAST,
    ]
    finetune.run(compose("finetune", common))
    evaluate.run(compose("evaluate", common))
    dirs = stage_dirs(compose("evaluate", common))
    ev = dirs["evaluate"] / "custom"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 40 and set(metrics["per_class"]) == {"neg", "pos"}
    ft = read_manifest(dirs["finetune"])
    assert ft["config"]["task"]["labels"] == ["neg", "pos"]


def test_tiny_llama_with_lora_from_cpt_to_prompting(tmp_path):
    common = [
        "model=tiny-llama",
        "peft=lora",
        "method=ties",
        "init=merged",
        f"run.root={tmp_path}",
        "run.name=l",
        *FAST,
    ]
    cfg = compose("finetune", common)
    for stage in (cpt, extract, merge, finetune, evaluate):
        stage.run(cfg)
    prompt.run(compose("prompt", [*common, "shots=2"]))
    dirs = stage_dirs(cfg)
    assert AutoModelForCausalLM.from_pretrained(dirs["merge"] / "model")
    ft = dirs["finetune"]
    assert ft.name.startswith("ties-l1-d0.2@en-hi-lora") and "-sentiment-en-hi-lora" in ft.name
    assert AutoModelForSequenceClassification.from_pretrained(ft / "model").num_labels == 3
    for stage_dir in (
        dirs["cpt"],
        dirs["extract"],
        dirs["merge"],
        ft,
        dirs["evaluate"] / "sentiment-en-hi",
        tmp_path
        / "l"
        / "prompt"
        / PromptSpec.from_config(compose("prompt", [*common, "shots=2"])).folder_id,
    ):
        assert read_manifest(stage_dir) is not None, stage_dir


def test_multi_source_merge_of_cpt_and_an_english_task(tmp_path):
    common = [f"run.root={tmp_path}", "run.name=m", *FAST]
    cfg = compose("finetune", common)
    cpt.run(cfg)
    finetune.run(compose("finetune", [*common, "init=base", "task=english-sentiment-en-hi"]))
    multi = [
        "method=ties",
        "init=merged",
        "sources=[cpt,english-sentiment-en-hi]",
        "weights=[1.0,0.5]",
        *common,
    ]
    manifest = merge.run(compose("merge", multi))
    assert manifest["config"]["weights"] == [1.0, 0.5] and len(manifest["inputs"]) == 3
    ft = finetune.run(compose("finetune", multi))
    assert ft["arm"] == "TIES->FT (cpt+english-sentiment-en-hi, lambda=1)"
    evaluate.run(compose("evaluate", multi))
    report.run(compose("report", common))
    assert "cpt+english-sentiment-en-hi" in (tmp_path / "m" / "report" / "report.md").read_text()
