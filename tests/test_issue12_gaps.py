"""The study's loose ends: one lambda-selection rule for the sweep summary, the CLI's closing
line and the report (mean validation macro-F1 over seeds); CPT variants reported apart; one
multi-source merge per source seed; settings that change no output leave fingerprints alone."""

from __future__ import annotations

import json
import re

import numpy as np
from conftest import FAST, compose
from omegaconf import OmegaConf
from run_dirs import evaluation_work

from cmmerge.commands import finetune, report, sweep
from cmmerge.commands.summary import closing_line
from cmmerge.config import plan
from cmmerge.config.specs import NOT_IN_ID, MergeSpec, finetune_spec, source_finetune_spec
from cmmerge.config.values import run_context
from cmmerge.io.manifest import (
    NOT_OUTPUT_SETTINGS,
    fingerprint,
    read_manifest,
    sha256_bytes,
    write_json_atomic,
)
from cmmerge.reporting.study import chosen_scales, study
from cmmerge.stages.runner import run_transaction, stage_input

N = 300


def _predictions(accuracy: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1000 + seed)
    gold = np.random.default_rng(7).integers(0, 3, N)
    wrong = rng.random(N) > accuracy
    return gold.tolist(), np.where(wrong, (gold + rng.integers(1, 3, N)) % 3, gold).tolist()


def _finetune(root, ft_id, arm, seed, val, accuracy, merge_id="", config=None, task="t"):
    """A finished fine-tune ``<ft_id>-s<seed>`` (validation macro-F1 ``val``) and its
    evaluation on ``task``, written through the stage runner."""
    cfg = OmegaConf.create({"run": {"root": str(root.parent), "name": root.name}, "force": False})
    ft_dir = root / "finetune" / f"{ft_id}-s{seed}"

    def ft_work(d):
        return {"metrics": {"macro_f1": val}, "arm": arm, "task": task, "merge_id": merge_id}

    run_transaction(
        run_context(cfg), "finetune", ft_dir, {"seed": seed, **(config or {})}, [], ft_work
    )

    gold, pred = _predictions(accuracy, seed)
    f1 = float(np.mean([np.mean(np.array(pred)[np.array(gold) == k] == k) for k in range(3)]))
    ev_work = evaluation_work(gold, pred, f1, accuracy)

    run_transaction(
        run_context(cfg), "evaluate", root / "evaluate" / ft_dir.name / task, {"task": task},
        [stage_input(ft_dir, "make it")], ev_work,
    )  # fmt: skip


# -- 1. one lambda-selection rule -------------------------------------------------------------


def _disagreeing_sweep(root):
    """Two seeds: lambda 0.5 has the best single row (0.50, seed 0) but the worse mean (0.40);
    lambda 1 has the best mean (0.445). TIES: density 0.2 wins on the mean at lambda 0.5."""
    for seed, (v05, v1) in enumerate([(0.50, 0.45), (0.30, 0.44)]):
        _finetune(root, "task_arithmetic-l0.5@c-t", "TV->FT (lambda=0.5)", seed, v05, 0.6,
                  merge_id="task_arithmetic-l0.5@c")  # fmt: skip
        _finetune(root, "task_arithmetic-l1@c-t", "TV->FT (lambda=1)", seed, v1, 0.6,
                  merge_id="task_arithmetic-l1@c")  # fmt: skip
    for seed, (d2, d5) in enumerate([(0.41, 0.60), (0.40, 0.10)]):
        _finetune(root, "ties-l0.5-d0.2@c-t", "TIES->FT (lambda=0.5)", seed, d2, 0.6,
                  merge_id="ties-l0.5-d0.2@c")  # fmt: skip
        _finetune(root, "ties-l0.5-d0.5@c-t", "TIES->FT (lambda=0.5)", seed, d5, 0.6,
                  merge_id="ties-l0.5-d0.5@c")  # fmt: skip


def test_the_sweep_the_closing_line_and_the_report_choose_on_the_mean_over_seeds(tmp_path):
    root = tmp_path / "sw"
    _disagreeing_sweep(root)
    chosen = {r["method"]: r for r in chosen_scales(root)}
    assert (chosen["task_arithmetic"]["lambda"], chosen["task_arithmetic"]["seeds"]) == (1, "0 1")
    assert abs(chosen["task_arithmetic"]["val_macro_f1_mean"] - 0.445) < 1e-9
    assert (chosen["ties"]["lambda"], chosen["ties"]["density"]) == (0.5, 0.2)

    cfg = compose("sweep", [f"run.root={tmp_path}", "run.name=sw"])
    rows = sweep.write_summary(cfg)
    assert len(rows) == 8
    best = (root / "sweep" / "summary.md").read_text().split("## Best by validation")[1]
    assert "task_arithmetic@c-t | task_arithmetic | 1 |" in best
    assert "ties@c-t | ties | 0.5 | 0.2 |" in best and "0.5 | 0.5 |" not in best

    line = closing_line("sweep", cfg, {"job": "x", "finetune": {}})
    assert line.endswith(
        "best so far: task_arithmetic lambda=1 (val 0.4450, mean of 2 seeds), "
        "ties lambda=0.5 density=0.2 (val 0.4050, mean of 2 seeds)"
    )
    manifest = report.run(compose("report", [*_report_args(tmp_path, "sw")]))
    selection = manifest["lambda_selection"]
    assert selection["sw/task_arithmetic@c-t"]["lambda"] == 1
    assert selection["sw/ties@c-t"]["density"] == 0.2


def _sweep_args(tmp_path, name):
    return [f"run.root={tmp_path}", f"run.name={name}"]


def _report_args(tmp_path, name):
    return [f"run.root={tmp_path}", f"run.name={name}", "report.n_resamples=100"]


def test_the_closing_line_names_the_family_when_a_method_has_several(tmp_path):
    root = tmp_path / "two"
    for task in ("t", "u"):
        _finetune(root, f"ties-l1-d0.2@c-{task}", "TIES->FT (lambda=1)", 0, 0.5, 0.6,
                  merge_id="ties-l1-d0.2@c", task=task)  # fmt: skip
    line = closing_line("sweep", compose("sweep", _sweep_args(tmp_path, "two")), {"job": "x"})
    assert "ties@c-t lambda=1 density=0.2 (val 0.5000)" in line and "ties@c-u" in line
    empty = closing_line("sweep", compose("sweep", _sweep_args(tmp_path, "none")), {"job": "x"})
    assert empty.endswith("best so far: none yet")


# -- 2. CPT variants are arms of their own ----------------------------------------------------


def _cpt_manifest(root, cpt_id, epochs):
    write_json_atomic(
        root / "cpt" / cpt_id / "manifest.json",
        {"stage": "cpt", "status": "finished", "config": {"cpt": {"epochs": epochs, "lr": 1e-3}}},
    )


def _cpt_config(root, cpt_id):
    return {"init": "cpt", "init_dir": str(root / "cpt" / cpt_id / "model")}


def test_arms_of_different_cpt_variants_are_reported_apart(tmp_path):
    root = tmp_path / "dur"
    variants = {"en-hi-aaaaaa": (1, 0.55, 0.60), "en-hi-bbbbbb": (2, 0.60, 0.80)}
    for seed in range(2):
        _finetune(root, "base-t", "Full FT", seed, 0.5, 0.55)
        for cpt_id, (epochs, val, acc) in variants.items():
            _cpt_manifest(root, cpt_id, epochs)
            _finetune(root, f"cpt@{cpt_id}-t", "CPT->FT", seed, val, acc,
                      config=_cpt_config(root, cpt_id))  # fmt: skip
            _finetune(root, f"ties-l1-d0.2@{cpt_id}-t", "TIES->FT (lambda=1)", seed, val, acc,
                      merge_id=f"ties-l1-d0.2@{cpt_id}")  # fmt: skip
    arms, cells = study([root], n_resamples=100)
    names = sorted(a.arm for a in arms)
    assert names == [
        "CPT->FT [cpt en-hi-aaaaaa, epochs=1]",
        "CPT->FT [cpt en-hi-bbbbbb, epochs=2]",
        "Full FT",
        "TIES->FT (lambda=1) [cpt en-hi-aaaaaa, epochs=1]",
        "TIES->FT (lambda=1) [cpt en-hi-bbbbbb, epochs=2]",
    ]
    assert all(len(a.members) == 2 for a in arms)
    # each TIES arm is compared with the CPT->FT of its own CPT (same predictions: difference 0)
    for arm in arms:
        if arm.kind.startswith("TIES"):
            versus = cells[(arm.run, arm.group, "t")].versus
            assert versus["CPT->FT"].difference.estimate == 0.0
            assert versus["Full FT"].difference.estimate > 0

    # the default config's CPT is variant a: report.all_variants=true shows b too
    report.run(compose("report", [*_report_args(tmp_path, "dur"), "report.all_variants=true"]))
    table = (root / "report" / "report.md").read_text().split("## Against")[0]
    assert "| CPT->FT [cpt en-hi-aaaaaa, epochs=1] |" in table
    assert "| TIES->FT [cpt en-hi-bbbbbb, epochs=2] |" in table
    tex = (root / "report" / "study.tex").read_text()
    assert "CPT$\\rightarrow$FT [cpt en-hi-bbbbbb, epochs=2]" in tex


def test_one_cpt_variant_keeps_the_plain_names(tmp_path):
    root = tmp_path / "one"
    _cpt_manifest(root, "en-hi", 1)
    _finetune(root, "base-t", "Full FT", 0, 0.5, 0.5)
    _finetune(root, "cpt@en-hi-t", "CPT->FT", 0, 0.5, 0.5, config=_cpt_config(root, "en-hi"))
    _finetune(root, "ties-l1-d0.2@en-hi-t", "TIES->FT (lambda=1)", 0, 0.5, 0.5,
              merge_id="ties-l1-d0.2@en-hi")  # fmt: skip
    arms, _ = study([root], n_resamples=10)
    assert sorted(a.arm for a in arms) == ["CPT->FT", "Full FT", "TIES->FT (lambda=1)"]


# -- 3. a multi-source merge per source seed --------------------------------------------------


def merge_id(cfg) -> str:
    return MergeSpec.from_config(cfg).folder_id


MULTI = ["init=merged", "method=ties", "sources=[cpt,english-sentiment-en-hi]", "weights=[1,0.5]"]


def test_a_multi_source_merge_id_carries_its_source_seed_and_plain_ones_do_not():
    ids = {s: merge_id(compose("finetune", [*MULTI, f"seed={s}"])) for s in (0, 1)}
    assert ids == {
        s: f"ties-l1-d0.2-src_cpt+english-sentiment-en-hi_s{s}-w1+0.5@en-hi" for s in (0, 1)
    }
    plain = {
        merge_id(compose("finetune", ["init=merged", "method=ties", f"seed={s}"])) for s in (0, 1)
    }
    assert plain == {"ties-l1-d0.2@en-hi"}
    assert merge_id(compose("finetune", ["init=merged", "sources=[english-sentiment-en-hi]"])) == (
        "ties-l1-d0.2-src_english-sentiment-en-hi_s0@en-hi"
    )
    # a source fine-tuned with other settings is another source: another merge folder
    other = merge_id(compose("finetune", [*MULTI, "finetune.lr=1e-4"]))
    assert other.startswith("ties-l1-d0.2-src_cpt+english-sentiment-en-hi_s0-w1+0.5-")
    assert other != ids[0] and other.endswith("@en-hi")
    # ... with the same hash for every seed (the report groups the seeds into one arm)
    seed1 = merge_id(compose("finetune", [*MULTI, "finetune.lr=1e-4", "seed=1"]))
    assert seed1 == other.replace("_s0-", "_s1-")


def test_the_plan_makes_one_multi_source_merge_per_seed_from_that_seeds_source():
    cfg = compose(
        "pipeline", ["experiment=paper-arms", "run.root=/nonexistent", "pipeline.seeds=[0,1]"]
    )
    steps = plan.expand(cfg)
    merges = [s for s in steps if s.stage == "merge" and s.cfg.get("sources")]
    assert len(merges) == 2
    names = {int(s.cfg.seed): s.folder.name for s in merges}
    assert names[1] == names[0].replace("_s0-", "_s1-")  # training settings hashed alike
    for step in merges:
        seed = int(step.cfg.seed)
        assert re.search(rf"-src_cpt\+english-sentiment-en-hi_s{seed}-w1\+0\.5", step.folder.name)
        source = (
            step.folder.parents[1]
            / "finetune"
            / source_finetune_spec(step.cfg, "english-sentiment-en-hi").folder_id
        )
        assert source in step.needs
        assert re.fullmatch(rf"base-english-sentiment-en-hi(-[0-9a-f]{{6}})?-s{seed}", source.name)
        users = [s for s in steps if s.stage == "finetune" and step.folder in s.needs]
        assert [int(u.cfg.seed) for u in users] == [seed]
        assert users[0].folder.name == finetune_spec(users[0].cfg).folder_id
    sources = [s for s in steps if s.stage == "finetune" and s.cfg.task.name != "sentiment-en-hi"]
    assert sorted(int(s.cfg.seed) for s in sources) == [0, 1]
    # the plain merges stay one per lambda, shared by the seeds
    plain = [s for s in steps if s.stage == "merge" and not s.cfg.get("sources")]
    users = [s for s in steps if s.stage == "finetune" and plain[0].folder in s.needs]
    assert sorted(int(u.cfg.seed) for u in users) == [0, 1]


def test_the_seeds_of_a_multi_source_arm_are_one_arm_in_the_report(tmp_path):
    root = tmp_path / "ms"
    for seed in range(2):
        merge = f"ties-l1-d0.2-src_cpt+english-sentiment-en-hi_s{seed}-w1+0.5@en-hi"
        _finetune(root, f"{merge}-t", "TIES->FT (cpt+english-sentiment-en-hi, lambda=1)", seed,
                  0.5, 0.6, merge_id=merge)  # fmt: skip
    arms, _ = study([root], n_resamples=10)
    (arm,) = arms
    assert (
        arm.seeds == [0, 1]
        and arm.group == "ties-l1-d0.2-src_cpt+english-sentiment-en-hi-w1+0.5@en-hi-t"
    )
    assert arm.family == "ties-src_cpt+english-sentiment-en-hi-w1+0.5@en-hi-t"


# -- 4. settings that change no output --------------------------------------------------------


def test_one_list_of_non_output_settings_for_folder_ids_and_fingerprints():
    assert NOT_OUTPUT_SETTINGS <= NOT_IN_ID
    view = {"finetune": {"lr": 1e-3, "report_to": "none", "logging_steps": 50}, "seed": 0}
    louder = {"finetune": {"lr": 1e-3, "report_to": "tensorboard", "logging_steps": 1}, "seed": 0}
    assert fingerprint(view, []) == fingerprint(louder, [])
    assert fingerprint(view, []) != fingerprint({**view, "finetune": {"lr": 2e-3}}, [])
    cpt = {"cpt": {"lr": 1e-3, "save_steps": 100}}
    assert fingerprint(cpt, []) == fingerprint({"cpt": {"lr": 1e-3, "save_steps": 7}}, [])


def test_a_finished_finetune_is_not_redone_for_logging_or_tracking_settings(tmp_path):
    common = [f"run.root={tmp_path}", "run.name=fp", "init=base", *FAST]
    first = finetune.run(compose("finetune", common))
    assert not first.get("skipped")
    quiet = [*common, "finetune.logging_steps=7"]
    try:
        import tensorboard  # noqa: F401

        quiet.append("finetune.report_to=tensorboard")
    except ImportError:
        pass
    cfg = compose("finetune", quiet)
    folder = tmp_path / "fp" / "finetune" / finetune_spec(cfg).folder_id
    assert folder.name == finetune_spec(compose("finetune", common)).folder_id  # the same folder
    again = finetune.run(cfg)
    assert again.get("skipped") and again["finished_at"] == first["finished_at"]
    # a manifest written before these settings left the fingerprint is still up to date
    manifest = read_manifest(folder)
    blob = json.dumps({"config": manifest["config"], "inputs": manifest["inputs"]},
                      sort_keys=True, default=str)  # fmt: skip
    manifest["fingerprint"] = sha256_bytes(blob.encode())
    assert manifest["fingerprint"] != first["fingerprint"]
    write_json_atomic(folder / "manifest.json", manifest)
    assert finetune.run(cfg).get("skipped")
