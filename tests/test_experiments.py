"""The experiment configs: each composes, lists only what differs, and expands into the study
it promises (tasks x arms x lambdas x seeds, transfer evaluations, CPT variants, prompting)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import cmmerge, compose

from cmmerge.config import plan
from cmmerge.errors import CmmergeError
from cmmerge.presets import CONFIG_DIR

LAMBDAS = [0.1, 0.3, 0.5, 0.7, 1.0]


def _expand(experiment: str, *overrides: str):
    cfg = compose("pipeline", [f"experiment={experiment}", "run.root=/nonexistent", *overrides])
    steps = plan.expand(cfg)
    return cfg, steps, Counter(s.stage for s in steps)


def _finetunes(steps, task: str | None = None):
    return [s for s in steps if s.stage == "finetune" and (task is None or s.cfg.task.name == task)]


def test_every_experiment_is_a_global_package_that_lists_what_differs():
    files = sorted((CONFIG_DIR / "experiment").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"paper-xlmr", "paper-llama", "cpt-duration", "replicate-cpu"} <= names
    for path in files:
        text = path.read_text()
        assert text.startswith("# @package _global_"), path.name
        assert "stage:" not in text and "hydra:" not in text  # the stage's own keys stay its


def test_paper_xlmr_is_the_papers_grid():
    cfg, steps, count = _expand("paper-xlmr")
    assert cfg.model.name == "xlmr" and cfg.model.name_or_path == "FacebookAI/xlm-roberta-base"
    per_seed = {  # baselines + sequential + joint + TV and TIES over 5 lambdas + 2 multi-source
        "sentiment-en-hi": 2 + 1 + 1 + 2 * len(LAMBDAS) + 2,
        "sentiment-en-es": 2 + 1 + 1 + 2 * len(LAMBDAS) + 2,
        "hate-en-hi": 2 + 2 * len(LAMBDAS),  # no English hate data: no seq/joint/multi-source
    }
    for task, arms in per_seed.items():
        tuned = _finetunes(steps, task)
        assert len(tuned) == 3 * arms, task
        assert sorted({int(s.cfg.seed) for s in tuned}) == [0, 1, 2]
    sources = _finetunes(steps, "english-sentiment-en-hi")  # tau_en per seed, for both tasks
    assert {s.cfg.init for s in sources} == {"base"}
    assert sorted(int(s.cfg.seed) for s in sources) == [0, 1, 2]
    assert count["finetune"] == 3 * sum(per_seed.values()) + 3 == 135
    # one CPT (and task vector) per corpus; merges per corpus (a multi-source merge per seed:
    # its tau_en comes from that seed's fine-tune); hate-en-hi shares En-Hi's
    assert count["cpt"] == count["extract"] == 2
    assert count["merge"] == 2 * (2 * len(LAMBDAS) + 2 * 3)
    lambdas = sorted({float(s.cfg["lambda"]) for s in steps if s.stage == "merge"})
    assert lambdas == LAMBDAS
    # transfer: the sentiment models are evaluated on En-Ta and En-Ml as well
    evaluated = Counter(s.eval_task for s in steps if s.stage == "evaluate")
    assert evaluated["sentiment-en-ta"] == evaluated["sentiment-en-ml"] == 3 * 2 * 16
    assert evaluated["hate-en-hi"] == 3 * 12 and count["evaluate"] == 3 * (16 * 3 * 2 + 12)
    assert count["report"] == 1 and steps[-1].stage == "report"


def test_paper_llama_adds_lora_and_the_prompting_baselines():
    cfg, steps, count = _expand("paper-llama")
    assert cfg.model.name == "llama" and cfg.peft.name == "lora"
    assert count["finetune"] == 135 and count["cpt"] == 2
    assert all(
        str(s.folder.name).startswith("en-") and "lora" in s.folder.name
        for s in steps
        if s.stage == "cpt"
    )
    prompts = [s for s in steps if s.stage == "prompt"]
    assert len(prompts) == 3 * (1 + 3)  # per task: zero-shot once, 4-shot with each seed
    assert {(int(s.cfg.shots), s.cfg.prompt.init) for s in prompts} == {(0, "base"), (4, "base")}
    hate = {s.cfg.prompt.template for s in prompts if s.cfg.task.name == "hate-en-hi"}
    assert hate == {"Tweet: {text}\nHate speech:"}


def test_the_decoder_study_is_gemma_with_lora_prompting_and_transfer():
    """Issue 22's study: Gemma-3-270M (its folder given), LoRA CPT and fine-tuning, Full FT,
    CPT->FT, TV->FT and TIES->FT over three seeds with transfer, and prompting of the base."""
    cfg, steps, count = _expand("replicate-cpu-decoder", "model.name_or_path=/models/gemma")
    assert cfg.model.name == "gemma3-270m" and cfg.model.kind == "decoder"
    assert cfg.peft.name == "lora" and cfg.run.name == "replicate-cpu-decoder"
    assert count["cpt"] == 1 and count["merge"] == 2 and count["finetune"] == 4 * 3
    assert count["evaluate"] == 3 * 4 * 3  # En-Hi, and transfer to En-Ta and En-Ml
    assert {s.eval_task for s in steps if s.stage == "evaluate"} == {
        "sentiment-en-hi",
        "sentiment-en-ta",
        "sentiment-en-ml",
    }
    inits = Counter(str(s.cfg.init) for s in _finetunes(steps))
    assert inits == {"base": 3, "cpt": 3, "merged": 6}
    assert all("lora" in s.folder.name for s in steps if s.stage in ("cpt", "finetune"))
    prompts = [s for s in steps if s.stage == "prompt"]
    assert sorted((int(s.cfg.shots), int(s.cfg.seed)) for s in prompts) == [
        (0, 0), (4, 0), (4, 1), (4, 2)
    ]  # fmt: skip
    with pytest.raises(CmmergeError, match="make_gemma3_270m.sh"):
        from cmmerge.config.inputs import resolve_model

        resolve_model(compose("pipeline", ["experiment=replicate-cpu-decoder"]))


def test_cpt_duration_gives_each_duration_its_own_cpt_and_arms():
    cfg, steps, count = _expand("cpt-duration")
    epochs = [int(s.cfg.cpt.epochs) for s in steps if s.stage == "cpt"]
    assert epochs == [1, 2, 3, 5, 10] and len({s.folder for s in steps if s.stage == "cpt"}) == 5
    # per duration: CPT->FT and TIES->FT at 3 lambdas, 3 seeds; one Full FT for all durations
    assert count["finetune"] == 5 * (1 + 3) * 3 + 3 and count["merge"] == 5 * 3
    full_ft = [s for s in _finetunes(steps) if s.cfg.init == "base"]
    assert len(full_ft) == 3


def test_replicate_cpu_is_me5_small_on_a_cpu_budget():
    cfg, steps, count = _expand("replicate-cpu")
    assert cfg.model.name_or_path == "intfloat/multilingual-e5-small"
    assert cfg.cpt.max_steps == 300 and cfg.finetune.epochs == 1
    assert cfg.finetune.train_size == 3000  # the budget docs/results.md was measured with
    assert count["finetune"] == (2 + 2 + 2) * 3 and count["evaluate"] == 3 * count["finetune"]
    local = compose("pipeline", ["experiment=replicate-cpu", "model.name_or_path=/models/me5"])
    assert local.model.name_or_path == "/models/me5"


def _folders(steps) -> set[str]:
    return {str(s.folder) for s in steps}


def test_the_broadened_replication_plans_what_each_config_promises():
    """Issue 23's e5 study: each config composes and expands into its tasks, arms, lambdas,
    seeds and CPTs; the grown main study keeps every folder of the three-seed one."""
    main_cfg, main, _ = _expand("replicate-cpu")
    cpt = next(s.folder.name for s in main if s.stage == "cpt")
    five = [0, 1, 2, 3, 4]
    for name, task, corpus in (
        ("hate", "hate-en-hi", "en-hi"),
        ("en-es", "sentiment-en-es", "en-es"),
    ):
        cfg, steps, count = _expand(f"replicate-cpu-{name}")
        assert cfg.run.name == f"replicate-cpu-{name}" and cfg.task.name == task
        assert count["finetune"] == count["evaluate"] == 4 * 5 and count["cpt"] == 1
        assert sorted({int(s.cfg.seed) for s in _finetunes(steps)}) == five
        assert {s.eval_task for s in steps if s.stage == "evaluate"} == {task}
        folder = next(s.folder.name for s in steps if s.stage == "cpt")
        assert folder.startswith(f"{corpus}-") and (folder == cpt) == (corpus == "en-hi")
    _, seeds, count = _expand("replicate-cpu-seeds")
    assert _folders(main) <= _folders(seeds) and count["finetune"] == 6 * 5
    assert count["evaluate"] == 3 * 6 * 5  # En-Hi, and transfer to En-Ta and En-Ml
    cfg, grid, count = _expand("replicate-cpu-lambda")
    assert cfg.run.name == main_cfg.run.name and _folders(seeds) <= _folders(grid)
    merges = [(str(s.cfg.method.name), float(s.cfg["lambda"])) for s in grid if s.stage == "merge"]
    assert sorted(merges) == sorted((m, x) for m in ("task_arithmetic", "ties") for x in LAMBDAS)
    assert count["finetune"] == (2 + 2 * len(LAMBDAS)) * 5 and count["evaluate"] == 3 * 60
    cfg, steps, count = _expand("replicate-cpu-cpt-length")
    cpts = [s for s in steps if s.stage == "cpt"]
    assert [int(s.cfg.cpt.max_steps) for s in cpts] == [300, 1000, 3000]
    assert cpts[0].folder.name == cpt  # the study's CPT, made again in a run of its own
    assert cfg.run.name == "replicate-cpu-cpt-length" and count["merge"] == 3
    assert count["finetune"] == count["evaluate"] == 3 + 3 * 2 * 3


@pytest.mark.parametrize("study", ["replicate-cpu-hate", "replicate-cpu-en-es"])
def test_a_three_epoch_study_reuses_the_cpt_and_merges_and_makes_new_fine_tunes(study):
    _, one, _ = _expand(study)
    cfg, three, count = _expand(f"{study}-3ep")
    assert cfg.run.name == study and cfg.finetune.epochs == 3
    shared = {s.stage for s in one if s.folder in {t.folder for t in three}}
    assert shared == {"data", "cpt", "extract", "merge", "report"}
    assert count["finetune"] == count["evaluate"] == 4 * 5
    assert not _folders(_finetunes(one)) & _folders(_finetunes(three))


@pytest.mark.parametrize("experiment,finetunes", [("demo", 4), ("paper-arms", 24)])
def test_the_tiny_experiments_keep_their_arms(experiment, finetunes):
    _, steps, count = _expand(experiment)
    assert count["finetune"] == finetunes and count["cpt"] == 1


def test_a_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    from cmmerge.commands import pipeline

    cfg = compose(
        "pipeline", ["experiment=paper-xlmr", f"run.root={tmp_path}", "pipeline.dry_run=true"]
    )
    assert pipeline.run(cfg) is None
    text = capsys.readouterr().out
    assert f"plan for {Path(tmp_path) / 'paper-xlmr'}: 497 stages, 0 done, 497 to do" in text
    assert "  finetune     135      0  not measured yet" in text
    assert not (tmp_path / "paper-xlmr").exists()


def test_two_different_stages_in_one_folder_are_refused():
    bad = "pipeline.cpt_variants=[{seed: 1}, {seed: 1}]"  # same folder, same settings: shared
    _, steps, count = _expand("demo", bad)
    assert count["cpt"] == 1
    cfg = compose("pipeline", ["experiment=demo", "run.root=/nonexistent"])
    step = plan.Step("cpt", cfg, Path("/nonexistent/x"))
    other = plan.Step("cpt", plan.with_values(cfg, seed=5), Path("/nonexistent/x"))
    other.cfg.cpt.lr = 0.5
    table = plan._Plan()
    table.add(step)
    with pytest.raises(CmmergeError, match="would share"):
        table.add(other)


PAPER_ROWS = [
    "Full FT",
    "CPT$\\rightarrow$FT",
    "TV$\\rightarrow$FT",
    "TIES$\\rightarrow$FT",
    "TIES$\\rightarrow$FT (cpt+english-sentiment-en-hi)",
    "Joint FT (+english-sentiment-en-hi)",
    "Sequential FT (english-sentiment-en-hi first)",
]


@pytest.mark.slow  # 24 fine-tunes on the tiny encoder: `pytest -m slow`
def test_paper_arms_draws_the_lambda_plot_and_the_latex_table(tmp_path):
    """The README's `cmmerge pipeline experiment=paper-arms` (listed offline there, run here):
    every arm over two seeds, lambda chosen on mean validation macro-F1, the lambda plot and
    the LaTeX table, and the report's statistics (mean ± sd, intervals, p-values)."""
    proc = cmmerge("pipeline", "experiment=paper-arms", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "paper-arms" / "report"
    assert (out / "lambda_sentiment-en-hi.png").stat().st_size > 10_000
    tex = (out / "study.tex").read_text()
    assert tex.startswith("\\begin{tabular}{lc}\n\\toprule\nArm & sentiment-en-hi \\\\")
    rows = [line.split(" & ")[0] for line in tex.splitlines()[4:-2]]
    assert rows == PAPER_ROWS and tex.count("\\textbf{") == 1
    assert all(" $\\pm$ " in line for line in tex.splitlines()[4:-2])
    text = (out / "report.md").read_text()
    study, against = text.split("## Against Full FT and CPT->FT")
    assert study.count("(n=2)") == len(PAPER_ROWS) and " ± " in study
    assert "| TV->FT | sentiment-en-hi | " in against and "| Full FT | " in against
    ci = re.compile(r"\| 0\.\d{4} \[0\.\d{4}, 0\.\d{4}\] \| (Full FT|CPT->FT) \| [+-]0\.\d{4} "
                    r"\[[+-]0\.\d{4}, [+-]0\.\d{4}\] \| [01]\.\d{3} \(t-test\) "
                    r"\| [01]\.\d{3} \| [01]\.\d{3} \| 2 \|")  # fmt: skip
    assert len(ci.findall(against)) >= 2 * (len(PAPER_ROWS) - 2)
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = manifest["lambda_selection"]
    tv = next(v for k, v in chosen.items() if k.startswith("paper-arms/task_arithmetic@"))
    assert [c["lambda"] for c in tv["candidates"]] == [0.25, 0.5, 1.0]
    best = max(tv["candidates"], key=lambda c: (c["val"], -c["lambda"]))
    assert tv["lambda"] == best["lambda"]
    summary = re.search(r"TV->FT \| [^|]+ λ=([0-9.]+) \|", study)
    assert summary and float(summary.group(1)) == tv["lambda"]
