"""Tests of cmmerge.data: shipped samples, parsers, corpus building and bad-input errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cmmerge.data import (
    build_corpus,
    label_distribution,
    load_corpus_texts,
    load_task,
    load_task_config,
    normalize_text,
    samples_root,
)
from cmmerge.data.formats import parse_sentimix_conll
from cmmerge.errors import CmmergeError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cmmerge" / "configs"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
FULL_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]
needs_full_data = pytest.mark.skipif(not FULL_DATA.is_dir(), reason=f"no {FULL_DATA}")


def corpus_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "corpus" / f"{name}.yaml"))


def fixture_task(**overrides: object) -> dict:
    cfg = {
        "name": "fixture",
        "format": "sentimix_conll",
        "labels": list(LABELS),
        "fix_mojibake": True,
        "train": "spanglish_meta/train.conll",
        "validation": "spanglish_meta/train.conll",
        "validation_fraction": None,
        "test": "hinglish_mojibake/test.txt",
        "test_labels": "hinglish_mojibake/labels.csv",
    }
    cfg.update(overrides)
    return cfg


def sizes(ds) -> dict[str, int]:
    return {split: len(ds[split]) for split in ds}


@pytest.fixture(scope="module")
def hinglish():
    return load_task(load_task_config("sentiment-en-hi"), samples_root())


@pytest.fixture(scope="module")
def spanglish():
    return load_task(load_task_config("sentiment-en-es"), samples_root(), seed=0)


def test_configs_have_the_agreed_keys():
    tasks = (
        "sentiment-en-hi",
        "sentiment-en-es",
        "hate-en-hi",
        "sentiment-en-ta",
        "sentiment-en-ml",
        "english-sentiment-en-hi",
        "custom",
    )
    for name in tasks:
        cfg = load_task_config(name)
        assert cfg["name"] == name
        expected = {"hate-en-hi": ["non-hate", "hate"], "custom": None}.get(name, LABELS)
        assert cfg["labels"] == expected  # custom: null, inferred from the train file
        assert {"train", "test", "validation_fraction", "text_column", "label_map"} <= set(cfg)
        assert "lambda" not in cfg
    assert load_task_config("sentiment-en-es")["validation_fraction"] == 0.1
    assert corpus_config("en-hi")["task_train_sets"] == ["sentiment-en-hi"]
    assert corpus_config("en-es")["task_train_sets"] == ["sentiment-en-es"]
    assert (REPO / "data").resolve() == samples_root().resolve()


def test_hinglish_samples_load(hinglish):
    assert sizes(hinglish) == {"train": 1500, "validation": 300, "test": 300}
    assert hinglish["train"].column_names == ["text", "label"]
    dist = label_distribution(hinglish, LABELS)
    assert {split: sum(c.values()) for split, c in dist.items()} == sizes(hinglish)
    assert all(count > 50 for counts in dist.values() for count in counts.values())
    assert all(isinstance(t, str) and t for t in hinglish["test"]["text"])


def test_hinglish_sample_files_keep_the_source_format(hinglish):
    folder = samples_root() / "sentimix_hinglish"
    test = (folder / "Hindi_test_unalbelled_conll_updated.txt").read_bytes()
    labels = (folder / "test_labels_hinglish.txt").read_bytes()
    assert test.startswith(b"meta\t") and test.count(b"\r\n") == test.count(b"\n")
    assert labels.startswith(b"Uid,Sentiment\r\n") and labels.count(b"\r\n") == 301
    assert test.count("â€".encode()) > 50  # the mojibake is shipped as is ...
    texts = hinglish["test"]["text"]
    assert not any("â€" in t for t in texts)  # ... and repaired when loaded
    assert sum("’" in t for t in texts) == 13


def test_spanglish_samples_load(spanglish):
    assert sizes(spanglish) == {"train": 1620, "validation": 180, "test": 300}
    dist = label_distribution(spanglish, LABELS)
    for label in LABELS:  # stratified: validation keeps the train proportions
        share_val = dist["validation"][label] / 180
        share_train = dist["train"][label] / 1620
        assert abs(share_val - share_train) < 0.01
    assert set(spanglish["test"]["label"]) == {0, 1, 2}
    assert len(spanglish["train"]) + len(spanglish["validation"]) == 1800


def test_load_task_is_deterministic_for_a_seed(spanglish):
    again = load_task(load_task_config("sentiment-en-es"), samples_root(), seed=0)
    other = load_task(load_task_config("sentiment-en-es"), samples_root(), seed=1)
    for split in ("train", "validation", "test"):
        assert again[split]["text"] == spanglish[split]["text"]
        assert again[split]["label"] == spanglish[split]["label"]
    assert other["validation"]["text"] != spanglish["validation"]["text"]


def test_load_task_accepts_a_hydra_dictconfig():
    ds = load_task(OmegaConf.create(fixture_task()), FIXTURES)
    assert sizes(ds) == {"train": 3, "validation": 3, "test": 2}


def test_spanglish_meta_token_is_a_word_not_a_header():
    path = FIXTURES / "spanglish_meta" / "train.conll"
    records = parse_sentimix_conll(path, "test")
    assert [(r.uid, r.label, r.text) for r in records] == [
        ("1", "positive", "Mi meta es ganar lol"),
        ("2", "negative", "meta first"),
        ("3", "neutral", "ok"),
    ]
    ds = load_task(fixture_task(), FIXTURES)
    assert ds["train"]["label"] == [2, 0, 1]


def test_mojibake_repaired_and_test_labels_joined_by_uid():
    ds = load_task(fixture_task(), FIXTURES)
    assert ds["test"]["text"] == ["kal mil 😅", "can ’ t"]
    assert ds["test"]["label"] == [2, 0]
    raw = load_task(fixture_task(fix_mojibake=False), FIXTURES)
    assert raw["test"]["text"][0] == "kal mil ðŸ˜…"


def test_normalize_text():
    assert normalize_text("  Cafe\u0301 \t hai\n\u00a0yaar  ") == "Café hai yaar"
    assert normalize_text(" \r\n ") == ""


def test_build_corpus_counts_duplicates_and_leakage():
    texts = ["a  b", "c", "a b", "", "  ", "test one", "d", "c", "test  one", "e\u0301"]
    kept, stats = build_corpus(texts, exclude=["test one", "é", "not in corpus"])
    assert kept == ["a b", "c", "d"]
    assert stats == {
        "raw": 10,
        "empty_removed": 2,
        "duplicates_removed": 2,
        "leakage_removed": 3,
        "kept": 3,
    }


def test_corpus_texts_from_samples(spanglish):
    texts = load_corpus_texts(corpus_config("en-es"), samples_root(), seed=0)
    assert len(texts) == 3000 + 1620
    assert texts[3000:] == spanglish["train"]["text"]  # train split only, never validation
    given = {"sentiment-en-es": load_task_config("sentiment-en-es")}
    assert load_corpus_texts(corpus_config("en-es"), samples_root(), given) == texts
    hi = load_corpus_texts(corpus_config("en-hi"), samples_root())
    assert len(hi) == 3000 + 1500 and all(hi[:3000])
    exclude = [*spanglish["validation"]["text"], *spanglish["test"]["text"]]
    kept, stats = build_corpus(texts, exclude)
    assert (
        stats["kept"]
        == len(kept)
        == stats["raw"]
        - stats["duplicates_removed"]
        - stats["leakage_removed"]
        - stats["empty_removed"]
    )
    assert not set(kept) & {normalize_text(t) for t in exclude}


def write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


GOOD = b"meta\t1\tpositive\nok\tlang1\n\nmeta\t2\tnegative\nno\tlang1\n\n"


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        (None, "file not found: {path} (task fixture, key train"),
        (b"", "empty file: {path}"),
        (b"\r\n\r\n", "empty file: {path}"),
        (GOOD + b"meta\t3\tjoy\nhi\tlang1\n", "unknown label(s) 'joy' (1x, line(s) 7) in {path}"),
        (GOOD + b"meta\t3\tneutral\nma\xf1ana\tlang2\n", "undecodable bytes in {path} line 8"),
        (b"hola\tlang2\n" + GOOD, "{path} line 1: token line before any 'meta<TAB>uid' header"),
        (b"meta\t1\nok\tlang1\n", "{path} line 1: tweet 1 has no label"),
    ],
)
def test_bad_input_raises_one_clear_line(tmp_path: Path, train: bytes | None, expected: str):
    write(tmp_path, "test.conll", GOOD)
    if train is not None:
        write(tmp_path, "train.conll", train)
    cfg = fixture_task(train="train.conll", validation="test.conll", test="test.conll")
    cfg["test_labels"] = None
    with pytest.raises(CmmergeError) as err:
        load_task(cfg, tmp_path)
    message = str(err.value)
    assert expected.format(path=tmp_path / "train.conll") in message
    assert "\n" not in message


def test_bad_data_root_and_labels_file(tmp_path: Path):
    with pytest.raises(CmmergeError, match="data root folder not found: .*nowhere"):
        load_task(fixture_task(), tmp_path / "nowhere")
    write(tmp_path, "labels.csv", b"Uid,Sentiment\n101,positive\n")
    cfg = fixture_task(test_labels=str(tmp_path / "labels.csv"))
    with pytest.raises(CmmergeError, match=r"labels.csv: no label for 1 uid\(s\).*\['102'\]"):
        load_task(cfg, FIXTURES)
    with pytest.raises(CmmergeError, match="no validation split: set task.validation=PATH"):
        load_task(fixture_task(validation=None), FIXTURES)
    with pytest.raises(CmmergeError, match=r"corpus x, source 0 \(nothing.txt\)"):
        load_corpus_texts({"name": "x", "sources": [{"path": "nothing.txt"}]}, FIXTURES)


@pytest.mark.slow
@needs_full_data
def test_full_data_split_sizes():
    hi = load_task(load_task_config("sentiment-en-hi"), FULL_DATA)
    assert sizes(hi) == {"train": 14000, "validation": 3000, "test": 3000}
    es = load_task(load_task_config("sentiment-en-es"), FULL_DATA)
    assert sizes(es) == {"train": 10801, "validation": 1201, "test": 2998}
    dist = label_distribution(hi, LABELS)
    assert dist["test"] == {"negative": 900, "neutral": 1100, "positive": 1000}


@pytest.mark.slow
@needs_full_data
def test_make_samples_reproduces_the_shipped_samples(tmp_path: Path):
    script = REPO / "scripts" / "make_samples.py"
    cmd = [sys.executable, str(script), str(FULL_DATA), "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (samples_root() / rel).read_bytes(), rel
