"""The plan's time estimate (cmmerge/config/timing.py): a CPT is estimated by its length from
the seconds per step of the finished CPTs (a resumed one counts the steps its last run made), the
other stages by the median wall time of their kind and task; nothing measured, no estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cmmerge.config.plan import Step
from cmmerge.config.timing import cpt_rate, duration, estimate

CPT = {"batch_size": 32, "grad_accum": 1, "max_length": 64}


def _finished(folder: Path, stage: str, wall: float, **extra) -> None:
    folder.mkdir(parents=True)
    manifest = {"stage": stage, "status": "finished", "wall_time_s": wall, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _cpt_step(root: Path, max_steps, **section) -> Step:
    cfg = OmegaConf.create(
        {"cpt": {**CPT, "max_steps": max_steps, **section}, "task": {"name": "t"}}
    )
    return Step("cpt", cfg, root / "cpt" / f"c{max_steps}")


def test_a_cpt_is_estimated_by_its_length(tmp_path):
    # 300 steps: 200 of them after a resume, in 400 s of training, 20 s outside it
    metrics = {"steps": 300, "train_runtime_s": 400.0, "resumed_at_step": 100}
    _finished(tmp_path / "cpt/a", "cpt", 420.0, metrics=metrics, config={"cpt": CPT})
    per_token, outside = cpt_rate(json.loads((tmp_path / "cpt/a/manifest.json").read_text()))
    assert per_token == pytest.approx(2.0 / (32 * 64)) and outside == pytest.approx(20.0)
    seconds, known, unknown = estimate([_cpt_step(tmp_path, 3000)], tmp_path)
    assert (known, unknown) == (1, 0) and seconds == pytest.approx(3000 * 2.0 + 20)
    # twice the tokens a step, and a head warm-up counted as steps
    seconds, _, _ = estimate([_cpt_step(tmp_path, 1000, batch_size=64, head_warmup_steps=200)],
                             tmp_path)  # fmt: skip
    assert seconds == pytest.approx(1200 * 4.0 + 20)
    # by epochs (no max_steps): the median CPT wall time
    seconds, _, _ = estimate([_cpt_step(tmp_path, None)], tmp_path)
    assert seconds == pytest.approx(420.0)


def test_other_stages_by_the_median_of_their_kind_and_nothing_measured(tmp_path):
    step = Step("finetune", OmegaConf.create({"task": {"name": "t"}}), tmp_path / "ft")
    assert estimate([step, _cpt_step(tmp_path, 300)], tmp_path) == (0.0, 0, 2)
    for i, wall in enumerate((100.0, 300.0, 200.0)):
        _finished(tmp_path / f"finetune/f{i}", "finetune", wall, task="t")
    _finished(tmp_path / "finetune/other", "finetune", 900.0, task="u")
    assert estimate([step], tmp_path) == (200.0, 1, 0)
    # fine-tunes of as many epochs, where the run has them
    config = {"finetune": {"epochs": 3}}
    _finished(tmp_path / "finetune/e3", "finetune", 700.0, task="t", config=config)
    three = Step("finetune", OmegaConf.create({"task": {"name": "t"}, **config}), tmp_path / "x")
    assert estimate([three], tmp_path) == (700.0, 1, 0)
    assert estimate([step], tmp_path) == (200.0, 1, 0)  # the three that recorded no epochs either
    assert estimate([_cpt_step(tmp_path, 300)], tmp_path) == (0.0, 0, 1)  # no CPT measured
    assert (duration(45), duration(600), duration(9000)) == ("45 s", "10 min", "2.5 h")
