"""Tests of `cmmerge data`: stats.json on the shipped samples, the printed summary, the leakage
guard across all benchmark tasks, and bad input through the real CLI (exit status 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import cmmerge, compose

from cmmerge.commands import data as data_stage
from cmmerge.config.inputs import cpt_corpus, evaluation_texts, leakage_tasks
from cmmerge.stages.data import collect_stats

REPO = Path(__file__).resolve().parent.parent
FULL_DATA = REPO.parent / "shared" / "data"
BENCHMARKS = [
    "sentiment-en-hi",
    "sentiment-en-es",
    "hate-en-hi",
    "sentiment-en-ta",
    "sentiment-en-ml",
    "lid-en-hi",
    "lid-en-es",
    "lid-en-hi-l3cube",
]


def test_data_stage_writes_stats_on_the_samples(tmp_path: Path, capsys):
    cfg = compose(
        "data", [f"run.root={tmp_path}", "task=sentiment-en-ta", "eval_tasks=[sentiment-en-ml]"]
    )
    manifest = data_stage.run(cfg)
    stats = json.loads((tmp_path / "default" / "data" / "stats.json").read_text())
    task, corpus = stats["task"], stats["corpus"]
    assert task["sizes"] == {"train": 1302, "validation": 145, "test": 297}
    assert task["splits"]["test"]["dropped_by_label_map"] == {"not-Tamil": 3}
    assert task["splits"]["train"]["token_lengths"]["p50"] > 5
    assert "code_mixing" not in task["splits"]["train"]  # Dravidian TSVs have no word tags
    assert corpus["leakage_tasks"] == BENCHMARKS and "leakage_tasks_skipped" not in corpus
    assert corpus["raw"] == 3000 + 1500 and corpus["missing_sources"] == [
        "hinglish_unlabeled/l3cube_hinglid/validation.txt"
    ]
    assert (
        corpus["kept"]
        == corpus["raw"]
        - corpus["duplicates_removed"]
        - corpus["leakage_removed"]
        - corpus["empty_removed"]
    )
    assert set(corpus["code_mixing"]["language_share"]) == {"en", "hi"}
    assert manifest["metrics"]["corpus_leakage_removed"] == corpus["leakage_removed"]
    out = capsys.readouterr().out
    assert "task sentiment-en-ta" in out and "dropped by label map {'not-Tamil': 3}" in out
    again = data_stage.run(cfg)  # finished: skipped, summary printed again
    assert again["skipped"] and "corpus en-hi" in capsys.readouterr().out


def test_sentimix_stats_have_code_mixing_and_the_guard_is_complete(tmp_path: Path):
    cfg = compose("data", [f"run.root={tmp_path}", "data.token_lengths=false"])
    stats = collect_stats(data_stage.data_job(cfg))
    mix = stats["task"]["splits"]["train"]["code_mixing"]
    assert mix["language_share"] == {"en": 0.4217, "hi": 0.5783}
    assert stats["task"]["splits"]["test"]["mojibake_repaired"] == 218
    assert "token_lengths" not in stats["task"]["splits"]["train"]
    assert leakage_tasks(cfg) == BENCHMARKS
    texts, _ = cpt_corpus(cfg)
    assert not set(texts) & evaluation_texts(cfg)


def test_leakage_tasks_missing_under_data_root_are_skipped_and_reported(tmp_path: Path):
    root = tmp_path / "data"  # SentiMix Hinglish and L3Cube only
    root.mkdir()
    for sub in ("sentimix_hinglish", "hinglish_unlabeled"):
        os.symlink(REPO / "cmmerge" / "samples" / sub, root / sub)
    cfg = compose("data", [f"run.root={tmp_path}", f"data.root={root}"])
    _, stats = cpt_corpus(cfg)
    hinglish = ["sentiment-en-hi", "lid-en-hi", "lid-en-hi-l3cube"]  # SentiMix Hinglish, L3Cube
    assert stats["leakage_tasks"] == hinglish
    assert set(stats["leakage_tasks_skipped"]) == set(BENCHMARKS) - set(hinglish)
    bad = compose(
        "data", [f"run.root={tmp_path}", f"data.root={root}", "eval_tasks=[sentiment-en-es]"]
    )
    with pytest.raises(Exception, match="file not found: .*Spanglish_train.conll"):
        cpt_corpus(bad)  # an eval task must load


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cmmerge(*args, cwd=cwd)


def test_cli_bad_custom_file_exits_2_with_one_line(tmp_path: Path):
    (tmp_path / "train.csv").write_text("id,sentence\n1,hello\n")
    out = run_cli(
        "data",
        "task=custom",
        "task.train=train.csv",
        "task.test_fraction=0.2",
        f"run.root={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (
        f"cmmerge data: error: {tmp_path}/train.csv: no text column 'text'; "
        "columns found: id, sentence (set task.text_column; task custom, key "
        "train)"
    )
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "default" / "data" / "manifest.json").exists()


REPLICATION_LEAKAGE = [
    "sentiment-en-hi",
    "sentiment-en-es",
    "hate-en-hi",
    "sentiment-en-ta",
    "sentiment-en-ml",
]


@pytest.mark.slow
@pytest.mark.skipif(not FULL_DATA.is_dir(), reason=f"no {FULL_DATA}")
@pytest.mark.parametrize(
    ("task", "sizes", "leakage"),
    [
        ("sentiment-en-hi", {"train": 14000, "validation": 3000, "test": 3000}, 217),
        ("sentiment-en-es", {"train": 10801, "validation": 1201, "test": 2998}, None),
        ("hate-en-hi", {"train": 3201, "validation": 458, "test": 915}, 217),  # 1 blank dropped
        ("sentiment-en-ta", {"train": 9870, "validation": 1097, "test": 1231}, 217),
        ("sentiment-en-ml", {"train": 3783, "validation": 421, "test": 480}, 217),
        ("english-sentiment-en-hi", {"train": 1185, "validation": 225, "test": 290}, 217),
    ],
)
def test_full_data_counts(tmp_path: Path, task, sizes, leakage):
    corpus = "en-es" if task == "sentiment-en-es" else "en-hi"
    cfg = compose(
        "data",
        [
            f"run.root={tmp_path}",
            f"data.root={FULL_DATA}",
            f"task={task}",
            f"corpus={corpus}",
            "data.token_lengths=false",
            # the replication's pinned list (experiment=replicate-cpu): the default list also
            # guards the LID tasks, whose held-out tweets come from this corpus
            f"data.leakage_tasks=[{','.join(REPLICATION_LEAKAGE)}]",
        ],
    )
    stats = collect_stats(data_stage.data_job(cfg))
    assert stats["task"]["sizes"] == sizes
    if leakage is not None:
        assert stats["corpus"]["leakage_removed"] == leakage
