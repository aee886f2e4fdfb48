"""Output a person reads (issue 15, item 4): one line per logged step and no raw Trainer dicts,
a closing line per stage with its key result and folder, no stray Hydra logs."""

from __future__ import annotations

import logging

import torch
from conftest import compose, tiny_llama
from test_cli import cmmerge
from transformers import PrinterCallback, ProgressCallback, Trainer

from cmmerge.commands.summary import closing_line
from cmmerge.training.arguments import (
    LogCallback,
    ProgressBars,
    readable_output,
    step_line,
    training_arguments,
)


def test_trainer_logs_are_one_line_each_and_never_a_raw_dict(tmp_path, capsys, caplog):
    torch.manual_seed(0)
    args = training_arguments(tmp_path, {"batch_size": 2, "lr": 1e-3}, seed=0)
    trainer = readable_output(Trainer(model=tiny_llama(16), args=args, callbacks=[LogCallback()]))
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert PrinterCallback not in kinds and ProgressCallback not in kinds
    assert (ProgressBars in kinds) == (not args.disable_tqdm)  # bars only on a terminal
    trainer.state.global_step, trainer.state.max_steps = 50, 188
    with caplog.at_level(logging.INFO, logger="cmmerge"):
        trainer.log({"loss": 1.09876, "learning_rate": 0.00082, "eval_runtime": 0.7})
    assert "{" not in capsys.readouterr().out  # the printer's raw dict is gone
    assert [r.getMessage() for r in caplog.records] == [
        "step 50/188 (epoch 0): loss=1.099, learning_rate=0.00082"
    ]


def test_step_line_drops_timings_and_shows_the_epoch():
    logs = {"eval_loss": 1.0962, "eval_macro_f1": 0.16289, "eval_samples_per_second": 433.3}
    assert step_line(47, 188, {**logs, "epoch": 1.0}) == (
        "step 47/188 (epoch 1): eval_loss=1.096, eval_macro_f1=0.1629"
    )


def _manifest(**extra) -> dict:
    return {"skipped": False, "wall_time_s": 0.73, **extra}


def test_closing_lines_say_the_key_result_and_where_it_is(tmp_path):
    cfg = compose("merge", [f"run.root={tmp_path}", "run.name=hi", "lambda=0.5", "density=0.2"])
    run = tmp_path / "hi"
    merge = _manifest(
        config={"method": "ties", "lambda": 0.5, "params": {"density": 0.2}},
        metrics={"n_merged": 36, "n_copied": 4},
    )
    assert closing_line("merge", cfg, merge) == (
        "cmmerge merge: ties lambda=0.5 density=0.2: 36 tensors merged, 4 copied in 0.7 s "
        f"-> {run / 'merge' / 'ties-l0.5-d0.2@en-hi' / 'model'}"
    )
    skipped = closing_line("merge", cfg, {**merge, "skipped": True})
    assert skipped.startswith("cmmerge merge: up to date (force=true redoes it): ties lambda=0.5")
    cpt = _manifest(metrics={"perplexity_before": 3976.4, "perplexity": 1215.22, "steps": 150})
    assert closing_line("cpt", cfg, cpt) == (
        "cmmerge cpt: held-out perplexity 3976.4 -> 1215.2 after 150 steps -> "
        f"{run / 'cpt/en-hi/model'}"
    )
    extract = _manifest(metrics={"n_tensors": 36, "n_params": 390_000, "l2_norm": 3.25})
    line = closing_line("extract", cfg, extract)
    assert "36 tensors" in line and "L2 norm 3.25" in line and "task_vector.safetensors" in line
    ft = _manifest(arm="Full FT", metrics={"macro_f1": 0.5099, "accuracy": 0.52})
    line = closing_line("finetune", compose("finetune", [f"run.root={tmp_path}", "init=base"]), ft)
    assert line.startswith("cmmerge finetune: Full FT: validation macro-F1 0.5099")
    assert line.endswith("finetune/base-sentiment-en-hi-s0/model")
    line = closing_line("evaluate", cfg, {"sentiment-en-hi": {"macro_f1": 0.5261}})
    assert line.startswith("cmmerge evaluate: test macro-F1 0.5261 on sentiment-en-hi -> ")
    assert closing_line("status", cfg, {}) is None


def test_sweep_line_names_the_summary(tmp_path):
    # the lambda it names: tests/test_issue12_gaps.py (the choice of the report and summary)
    cfg = compose("sweep", [f"run.root={tmp_path}", "run.name=sw"])
    line = closing_line("sweep", cfg, {"job": "ties-l1-d0.2-sentiment-en-hi-s0", "finetune": {}})
    assert line.startswith("cmmerge sweep: job ties-l1-d0.2-sentiment-en-hi-s0 done; ")
    assert f"summary in {tmp_path / 'sw' / 'sweep' / 'summary.md'}" in line


def test_a_standalone_merge_prints_its_line_and_leaves_no_runs_folder(tmp_path):
    torch.manual_seed(0)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    model = tiny_llama(32)
    model.save_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tuned)
    out = tmp_path / "merged"
    proc = cmmerge(
        "merge",
        f"base={base}",
        f"models=[{tuned}]",
        "method=task_arithmetic",
        "lambda=1.0",
        f"output={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("cmmerge merge: task_arithmetic lambda=1: ")
    assert "tensors merged" in last and last.endswith(f"-> {out}")
    assert (out / "manifest.json").exists() and (out / "merge.log").exists()
    shown = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert shown == ["base", "merged", "tuned"]  # no runs/default/logs/, no .hydra/
