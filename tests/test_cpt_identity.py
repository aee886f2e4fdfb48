"""A CPT checkpoint is identified by the corpus it trains on, not by the list of tasks the
leakage guard read: another task's run that excludes no further text shares it (also one
recorded before the corpus identified it), one that excludes more makes it again, and the plan
sees a setting changed under the same folder name."""

from __future__ import annotations

import shutil

from conftest import compose

from cmmerge.io.manifest import fingerprint, manifest_hash, read_manifest, write_json_atomic
from cmmerge.io.transaction import stale_inputs
from cmmerge.settings import SAMPLES_DIR
from cmmerge.stages import cpt, extract, plan
from cmmerge.stages.ids import stage_dirs
from cmmerge.stages.inputs import data_inputs

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


def _as_recorded_before(folder, cfg) -> None:
    """Rewrite a finished CPT's manifest the way cmmerge recorded it before the corpus hash:
    the leakage list in the config, every guarded task's files among the inputs."""
    manifest = read_manifest(folder)
    listed = manifest["corpus"]["leakage_tasks"]
    files = [i for i in manifest["inputs"] if "corpus" not in i]
    guarded = [i for i in data_inputs(cfg, [], corpus=True, guard=True) if i not in files]
    manifest["config"] = {**manifest["config"], "leakage_tasks": listed}
    manifest["inputs"] = [*files, *guarded]
    manifest["fingerprint"] = fingerprint(manifest["config"], manifest["inputs"])
    write_json_atomic(folder / "manifest.json", manifest)


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


def test_a_cpt_recorded_with_its_leakage_list_stays_valid_while_the_corpus_is_the_same(tmp_path):
    cfg = _cfg(tmp_path)
    cpt.run(cfg)
    folder = stage_dirs(cfg)["cpt"]
    _as_recorded_before(folder, cfg)
    extract.run(cfg)  # made from the manifest in its old form
    ext = read_manifest(stage_dirs(cfg)["extract"])
    before = manifest_hash(folder)
    for overrides in ([], SAME_TWEETS):
        again = cpt.run(_cfg(tmp_path, *overrides))
        assert again["skipped"] and manifest_hash(folder) == before, overrides
    assert stale_inputs(ext) == []  # the checkpoint and its task vector stand
    assert not plan.settings_changed(plan.Step("cpt", _cfg(tmp_path, *SAME_TWEETS), folder))
    redone = cpt.run(_cfg(tmp_path, *MORE_GUARDED))
    assert not redone["skipped"] and "leakage_tasks" not in redone["config"]
    assert stale_inputs(ext) == [str(folder)]


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
