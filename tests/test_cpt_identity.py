"""A CPT checkpoint is identified by the corpus it trains on, not by the list of tasks the
leakage guard read: another task's run that excludes no further text shares it, one that
excludes more makes it again, and the plan sees a setting changed under the same folder name."""

from __future__ import annotations

import shutil

from conftest import compose

from cmmerge.commands import cpt
from cmmerge.config import plan
from cmmerge.config.ids import stage_dirs
from cmmerge.io.manifest import manifest_hash
from cmmerge.presets import SAMPLES_DIR

TINY_CPT = [
    "run.name=r",
    "train=smoke",
    "cpt.max_steps=2",
    "cpt.batch_size=8",
    "cpt.max_length=32",
    "data.token_lengths=false",
    "data.leakage_tasks=[sentiment-en-hi]",
]
# SentiMix's word tags: the same tweets as sentiment-en-hi, so no further text leaves the corpus
SAME_TWEETS = ["task=lid-en-hi", "eval_tasks=[lid-en-hi]"]
# L3Cube's held-out 20% are in the Hinglish corpus: guarding them removes texts from it
MORE_GUARDED = ["data.leakage_tasks=[sentiment-en-hi,lid-en-hi-l3cube]"]


def _cfg(root, *extra: str):
    return compose("cpt", [f"run.root={root}", *TINY_CPT, *extra])


def test_another_task_with_the_same_corpus_shares_the_cpt(tmp_path):
    cfg = _cfg(tmp_path)
    made = cpt.run(cfg)
    folder = stage_dirs(cfg)["cpt"]
    corpus = next(i for i in made["inputs"] if "corpus" in i)
    assert corpus["texts"] == made["corpus"]["kept"] and len(corpus["sha256"]) == 64
    assert "leakage_tasks" not in made["config"]
    before = manifest_hash(folder)
    other = _cfg(tmp_path, *SAME_TWEETS)
    assert stage_dirs(other)["cpt"] == folder
    again = cpt.run(other)
    assert again["skipped"] and manifest_hash(folder) == before
    assert not plan.settings_changed(plan.Step("cpt", other, folder))


def test_a_guard_that_removes_more_texts_makes_the_cpt_again(tmp_path):
    cfg = _cfg(tmp_path)
    first = cpt.run(cfg)
    again = cpt.run(_cfg(tmp_path, *MORE_GUARDED))
    assert not again["skipped"]
    assert again["corpus"]["leakage_removed"] > first["corpus"]["leakage_removed"]
    assert again["corpus"]["kept"] < first["corpus"]["kept"]


def test_the_plan_sees_a_setting_changed_under_the_same_folder(tmp_path):
    cfg = _cfg(tmp_path)
    cpt.run(cfg)
    folder = stage_dirs(cfg)["cpt"]
    copy = shutil.copytree(SAMPLES_DIR, tmp_path / "data")
    assert plan.is_current(plan.Step("cpt", cfg, folder))
    for changed in ("data.split_seed=1", f"data.root={copy}"):  # fingerprinted, not in the name
        other = _cfg(tmp_path, changed)
        assert stage_dirs(other)["cpt"] == folder
        assert plan.settings_changed(plan.Step("cpt", other, folder)), changed
        assert not plan.is_current(plan.Step("cpt", other, folder))
