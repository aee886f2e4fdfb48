"""Training throughput: cmmerge's finetune and cpt stages against a plain transformers Trainer
script that pads every batch to max_length, on the same model, data, batch size and steps.

Each variant runs in its own process; the time spent in training steps (no evaluation or saving)
is timed, and useful tokens are the real (non-pad) tokens of the batches. Several runs, medians,
ratios.

    python scripts/bench_train.py --model /tmp/me5_small --steps 20 --runs 3
    python scripts/bench_train.py            # the tiny XLM-R (fast, overhead-dominated)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _texts(kind: str) -> tuple[list[str], list[int]]:
    from hydra import compose, initialize_config_module

    from cmmerge.config.inputs import cpt_corpus, task_splits

    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        cfg = compose(config_name="finetune")
    if kind == "finetune":
        train = task_splits(cfg)["train"]
        return list(train["text"]), list(train["label"])
    texts = cpt_corpus(cfg)[0]
    return texts, [0] * len(texts)


def plain_worker(args: argparse.Namespace) -> None:
    """The baseline: pad-to-max batches, no length grouping, plain Trainer."""
    from datasets import Dataset
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from cmmerge.training.arguments import StepTimer

    tok = AutoTokenizer.from_pretrained(args.model)
    texts, labels = _texts(args.kind)
    if args.kind == "finetune":
        ds = Dataset.from_dict({"text": texts, "label": labels})
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=3)
        collator = default_data_collator
    else:
        ds = Dataset.from_dict({"text": texts})
        model = AutoModelForMaskedLM.from_pretrained(args.model)
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    ds = ds.map(
        lambda b: tok(b["text"], truncation=True, max_length=args.max_length, padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=2e-5,
            report_to=["none"],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        timer = StepTimer()  # training steps only, measured the same way as cmmerge's
        Trainer(
            model=model, args=targs, train_dataset=ds, data_collator=collator, callbacks=[timer]
        ).train()
    real = [sum(m) for m in ds["attention_mask"]]
    mean_real = statistics.fmean(real)
    print(
        json.dumps(
            {
                "train_runtime": timer.seconds,
                "useful_tokens": mean_real * args.batch * args.steps,
                "pad_share": 1 - mean_real / args.max_length,
            }
        )
    )


def _cmmerge(kind: str, model: str, steps: int, batch: int, max_length: int, root: str) -> dict:
    section = "finetune" if kind == "finetune" else "cpt"
    cmd = [
        sys.executable,
        "-m",
        "cmmerge.cli",
        kind,
        "init=base",
        f"model.name_or_path={model}",
        f"run.root={root}",
        "force=true",
        f"{section}.max_steps={steps}",
        f"{section}.batch_size={batch}",
        f"{section}.max_length={max_length}",
        f"{section}.logging_steps=1000000",
    ]
    if kind == "finetune":
        cmd += ["finetune.early_stopping_patience=0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    stage = (
        Path(root)
        / "default"
        / ("finetune/base-sentiment-en-hi-s0" if kind == "finetune" else "cpt")
    )
    manifest = json.loads((stage / "manifest.json").read_text())
    runtime = manifest.get("train_runtime_s") or manifest["metrics"].get("train_runtime_s")
    if kind == "finetune":  # training steps only: the stage also evaluates and saves
        runtime = manifest["train_step_time_s"]
        tokens = manifest["train_tokens_per_s"] * runtime
    else:
        m = manifest["metrics"]
        tokens = m["train_tokens_per_epoch"] / m["train_texts"] * batch * steps
    return {"train_runtime": runtime, "useful_tokens": tokens}


def _timed(fn, *args) -> dict:
    start = time.time()
    out = fn(*args)
    out["wall"] = time.time() - start
    return out


def _plain(cmd: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF folder (default: the tiny XLM-R)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kinds", default="finetune,cpt")
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="finetune", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args)
        return
    if not args.model:
        from hydra import compose, initialize_config_module

        from cmmerge.config.inputs import resolve_model

        with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
            args.model = str(resolve_model(compose(config_name="finetune")))
    rows = []
    for kind in args.kinds.split(","):
        ours, plain = [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as root:
                ours.append(
                    _timed(
                        _cmmerge, kind, args.model, args.steps, args.batch, args.max_length, root
                    )
                )
            cmd = [
                sys.executable,
                __file__,
                "--plain-worker",
                "--kind",
                kind,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--max-length",
                str(args.max_length),
            ]
            plain.append(_timed(_plain, cmd))
        tps_ours = statistics.median(r["useful_tokens"] / r["train_runtime"] for r in ours)
        tps_plain = statistics.median(r["useful_tokens"] / r["train_runtime"] for r in plain)
        rows.append(
            (
                kind,
                tps_plain,
                tps_ours,
                tps_ours / tps_plain,
                plain[0]["pad_share"],
                statistics.median(r["wall"] for r in plain),
                statistics.median(r["wall"] for r in ours),
            )
        )
    print(
        f"\nmodel {args.model}, {args.steps} steps x batch {args.batch}, max_length "
        f"{args.max_length}, {args.runs} runs (medians)\n"
    )
    print(
        "| stage | plain Trainer, pad-to-max: useful tok/s | cmmerge: useful tok/s | ratio "
        "| padded share (plain) | plain wall s | cmmerge wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, a, b, r, pad, wa, wb in rows:
        print(f"| {kind} | {a:,.0f} | {b:,.0f} | {r:.2f}x | {pad:.0%} | {wa:.1f} | {wb:.1f} |")


if __name__ == "__main__":
    main()
