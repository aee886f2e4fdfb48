"""Tests of the issue-4 loaders: TSV/CSV/JSONL/hub tasks, label maps, the benchmark samples,
custom corpora, the leakage guard, statistics and every bad input, on files the tests write."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from cmmerge.data import (
    build_corpus,
    label_distribution,
    leakage_key,
    load_corpus,
    load_task,
    load_task_config,
    load_task_with_info,
    normalize_text,
    samples_root,
)
from cmmerge.data import hub as hub_module
from cmmerge.data.stats import code_mixing, length_percentiles, split_overlap, tokenize_cached
from cmmerge.errors import CmmergeError

LABELS = ["negative", "neutral", "positive"]


def write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def sizes(ds) -> dict[str, int]:
    return {split: len(ds[split]) for split in ds}


def custom(**overrides: object) -> dict:
    """The custom task with the three sentiment labels listed (``labels=None`` infers them)."""
    cfg = load_task_config("custom")
    cfg["root"] = None
    cfg["labels"] = LABELS
    cfg.update(overrides)
    return cfg


# ---- the benchmark samples shipped in cmmerge/samples -----------------------------------------


def test_hate_sample_joins_continuation_lines_and_splits_70_10_20():
    ds, info = load_task_with_info(load_task_config("hate-en-hi"), samples_root())
    assert info["train"]["read"] == 1006 and info["train"]["continuation_lines_joined"] == 4
    assert info["train"]["labelled"] == 1002
    assert sizes(ds) == {"train": 700, "validation": 101, "test": 201}
    dist = label_distribution(ds.remove_columns("tags"), ["non-hate", "hate"])
    assert dist["test"] == {"non-hate": 124, "hate": 77}
    texts = [t for split in ds.values() for t in split["text"]]
    assert (
        "I agree with @shoaib100mph on Padhe likhe log social media pe nafrat faila the hai "
        "isse acha toh hum gawar hi thik the phele. @abpnewstv" in texts
    )
    again = load_task(load_task_config("hate-en-hi"), samples_root())
    assert again["test"]["text"] == ds["test"]["text"]  # seeded


@pytest.mark.parametrize(
    ("task", "expected", "dropped"),
    [
        ("sentiment-en-ta", {"train": 1302, "validation": 145, "test": 297}, ("not-Tamil", 53, 3)),
        (
            "sentiment-en-ml",
            {"train": 783, "validation": 88, "test": 268},
            ("not-malayalam", 129, 32),
        ),
    ],
)
def test_dravidian_samples_map_labels_onto_sentimix(task, expected, dropped):
    ds, info = load_task_with_info(load_task_config(task), samples_root())
    assert sizes(ds) == expected
    name, n_train, n_test = dropped
    assert info["train"]["dropped_by_label_map"] == {name: n_train}
    assert info["test"]["dropped_by_label_map"] == {name: n_test}
    assert ds["train"].features["label"].names == LABELS
    assert all(t == t.strip() and t for t in ds["test"]["text"])


def test_english_subset_keeps_mostly_english_tweets_in_the_same_splits():
    hi = load_task(load_task_config("sentiment-en-hi"), samples_root())
    en, info = load_task_with_info(load_task_config("english-sentiment-en-hi"), samples_root())
    assert sizes(en) == {"train": 122, "validation": 29, "test": 33}
    assert info["train"]["filtered_out"] == 1500 - 122
    for split in ("train", "validation", "test"):  # same split discipline as sentiment-en-hi
        assert set(en[split]["text"]) <= set(hi[split]["text"])
    for tags in en["train"]["tags"]:
        langs = [t for t in tags if t in ("Eng", "Hin")]
        assert langs.count("Eng") / len(langs) >= 0.8
    strict = {**load_task_config("english-sentiment-en-hi"), "filter_min_share": 0.9}
    with pytest.raises(CmmergeError, match="split validation .* has no examples left"):
        load_task(strict, samples_root())  # 1 train tweet of 1,500 reaches 90%, no dev tweet


# ---- tabular, JSONL and hub loaders ------------------------------------------------------------

DRAVIDIAN = "text\tcategory\n" + "".join(
    f" comment {i} \t{label} \n"
    for i, label in enumerate(
        ["Positive", "Negative", "Mixed_feelings", "unknown_state", "not-Tamil"] * 4
    )
)


def test_tsv_labels_are_trimmed_mapped_and_dropped(tmp_path: Path):
    write(tmp_path, "ta/train.tsv", DRAVIDIAN)
    write(tmp_path, "ta/dev.tsv", DRAVIDIAN)
    cfg = {
        **load_task_config("sentiment-en-ta"),
        "train": "ta/train.tsv",
        "test": "ta/dev.tsv",
        "validation_fraction": 0.25,
    }
    ds, info = load_task_with_info(cfg, tmp_path)
    assert sizes(ds) == {"train": 12, "validation": 4, "test": 16}
    assert info["test"]["dropped_by_label_map"] == {"not-Tamil": 4}
    assert ds["test"]["text"][:3] == ["comment 0", "comment 1", "comment 2"]
    assert ds["test"]["label"][:4] == [2, 0, 1, 1]
    # one entry overridden from the command line: Mixed_feelings dropped, not-Tamil kept
    cfg["label_map"] = {**cfg["label_map"], "Mixed_feelings": None, "not-Tamil": "negative"}
    assert len(load_task(cfg, tmp_path)["test"]) == 16


def test_custom_csv_and_jsonl_with_other_column_names(tmp_path: Path):
    rows = [(f'great, "really" {i}', "pos") if i % 2 else (f"bad {i}", "neg") for i in range(20)]
    csv_text = "id,sentence,polarity\n" + "".join(
        f'{i},"{t.replace(chr(34), chr(34) * 2)}",{lab}\n' for i, (t, lab) in enumerate(rows)
    )
    write(tmp_path, "train.csv", csv_text)
    write(
        tmp_path,
        "test.jsonl",
        "".join(
            json.dumps({"sentence": t, "polarity": lab, "id": i}) + "\n"
            for i, (t, lab) in enumerate(rows[:6])
        ),
    )
    cfg = custom(
        train=str(tmp_path / "train.csv"),
        test=str(tmp_path / "test.jsonl"),
        text_column="sentence",
        label_column="polarity",
        labels=["neg", "pos"],
    )
    ds, info = load_task_with_info(cfg, "/nonexistent-data-root-is-not-used")
    assert sizes(ds) == {"train": 18, "validation": 2, "test": 6}
    assert info["train"]["format"] == "csv" and info["test"]["format"] == "jsonl"
    assert Counter(ds["validation"]["label"]) == {0: 1, 1: 1}  # stratified carve-out
    assert 'great, "really" 1' in [*ds["train"]["text"], *ds["validation"]["text"]]
    assert ds["test"]["label"] == [0, 1, 0, 1, 0, 1]
    mapped = load_task(
        {**cfg, "labels": LABELS, "label_map": {"neg": "negative", "pos": "positive"}}, tmp_path
    )
    assert set(mapped["test"]["label"]) == {0, 2}


def test_custom_task_reads_relative_paths_from_root_and_conll_by_content(tmp_path: Path):
    conll = "".join(f"meta\t{i}\t{LABELS[i % 3]}\nword{i}\tEng\n\n" for i in range(30))
    write(tmp_path, "d/train.txt", conll)
    write(tmp_path, "d/test.tsv", "text\tlabel\nhello\tneutral\n")
    cfg = custom(root=str(tmp_path), train="d/train.txt", test="d/test.tsv", test_fraction=None)
    ds = load_task(cfg, "/unused")
    assert sizes(ds) == {"train": 27, "validation": 3, "test": 1}
    both = load_task(
        custom(root=str(tmp_path), train="d/train.txt", test=None, test_fraction=0.2), "/unused"
    )
    assert sizes(both) == {"train": 21, "validation": 3, "test": 6}


def test_headerless_tsv_columns_by_index(tmp_path: Path):
    write(tmp_path, "h.tsv", "a text\tyes\nsecond\tno\nthird\tno\nfourth\tyes\n")
    cfg = {
        **load_task_config("hate-en-hi"),
        "train": "h.tsv",
        "test": "h.tsv",
        "validation": "h.tsv",
    }
    ds = load_task(cfg, tmp_path)
    assert ds["test"]["text"] == ["a text", "second", "third", "fourth"]
    assert ds["test"]["label"] == [1, 0, 0, 1]


def test_hub_task_maps_classlabel_names(monkeypatch):
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )
    part = {"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(part, features=features),
        validation=datasets.Dataset.from_dict(
            {"sentence": ["x", "y"], "label": [0, 1]}, features=features
        ),
    )
    monkeypatch.setattr(hub_module, "_cache", {("glue-like", None): fake})
    cfg = {
        **load_task_config("english-sentiment-en-hi"),
        "hub": "glue-like",
        "text_column": "sentence",
        "hub_splits": {"train": "train", "test": "validation"},
        "validation_fraction": 0.1,
    }
    ds, info = load_task_with_info(cfg, "/unused")
    assert sizes(ds) == {"train": 18, "validation": 2, "test": 2}
    assert ds["test"]["label"] == [0, 2] and info["test"]["source"] == "hub:glue-like[validation]"
    with pytest.raises(CmmergeError, match="no text column 'text'; columns found: sentence, label"):
        load_task({**cfg, "text_column": "text"}, "/unused")


def test_hub_unreachable_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {**load_task_config("english-sentiment-en-hi"), "hub": "nobody/no-such-dataset-xyz"}
    with pytest.raises(CmmergeError) as err:
        load_task(cfg, samples_root())
    assert "cannot load hub data set 'nobody/no-such-dataset-xyz'" in str(err.value)
    assert "\n" not in str(err.value)


# ---- bad input: one clear line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "overrides", "expected"),
    [
        ("train.csv", None, {}, "file not found: {path} (task custom, key train"),
        ("train.csv", b"", {}, "empty file: {path}"),
        ("train.csv", b"text,label\n", {}, "{path}: no validation"),
        (
            "train.csv",
            b"sentence,polarity\nhi,positive\n",
            {},
            "{path}: no text column 'text'; columns found: sentence, polarity",
        ),
        (
            "train.tsv",
            b"text\tstars\nhi\t5\n",
            {},
            "{path}: no label column 'label'; columns found: text, stars",
        ),
        (
            "train.jsonl",
            b'{"text": "hi", "y": 1}\n',
            {},
            "{path}: no label column 'label'; columns found: text, y",
        ),
        (
            "train.csv",
            b"text,label\na,positive\nb,joy\nc,joy\nd,meh\n",
            {},
            "unknown label(s) 'joy' (2x, line(s) 3, 4), 'meh' (1x, line(s) 5) in {path}",
        ),
        (
            "train.csv",
            b"text,label\na,positive\nma\xf1ana,neutral\n",
            {},
            "undecodable bytes in {path} line 3: 0xf1",
        ),
        (
            "train.jsonl",
            b'{"text": "a", "label": "positive"}\n{"text": \n',
            {},
            "{path} line 2: not JSON",
        ),
        ("train.csv", b"text,label\na,\n", {}, "{path} line 2: empty label"),
        ("train.tsv", b"text\tlabel\nonly-one-field\n", {}, "{path} line 2: 1 field(s)"),
        (
            "train.txt",
            b"hola\tlang2\nmeta\t1\tpositive\nok\tlang1\n",
            {"format": "conll"},
            "{path} line 1: token line before any 'meta<TAB>uid' header",
        ),
        (
            "train.csv",
            b"text,label\na,pos\n",
            {"label_map": {"pos": "great"}},
            "label_map maps 'pos' to 'great', which is not one of the labels",
        ),
        (
            "train.tsv",
            b"text\tlabel\na\tpositive\n",
            {"filter_language": "en"},
            "filter_language needs word-level language tags",
        ),
    ],
)
def test_bad_input(tmp_path: Path, name, data, overrides, expected):
    path = tmp_path / name
    if data is not None:
        write(tmp_path, name, data)
    if "no validation" in expected:  # a header and no rows: nothing left to train on
        expected = "has no examples left"
    write(tmp_path, "test.csv", "text,label\nx,positive\n")
    cfg = custom(
        train=str(path), test=str(tmp_path / "test.csv"), validation=str(path), **overrides
    )
    with pytest.raises(CmmergeError) as err:
        load_task(cfg, tmp_path)
    message = str(err.value)
    assert expected.format(path=path) in message
    assert "\n" not in message


def test_bad_task_configs(tmp_path: Path):
    write(tmp_path, "t.csv", "text,label\n" + "".join(f"t{i},positive\n" for i in range(5)))
    with pytest.raises(CmmergeError, match="no train file"):
        load_task(custom(), tmp_path)
    with pytest.raises(CmmergeError, match="no test split: set task.test=PATH"):
        load_task(custom(train=str(tmp_path / "t.csv")), tmp_path)
    with pytest.raises(CmmergeError, match="validation_fraction must be in"):
        load_task(
            custom(train=str(tmp_path / "t.csv"), test_fraction=0.2, validation_fraction=1.5),
            tmp_path,
        )
    with pytest.raises(CmmergeError, match="unknown format 'xml'"):
        load_task(custom(train=str(tmp_path / "t.csv"), test_fraction=0.2, format="xml"), tmp_path)


# ---- corpora, leakage guard and statistics ------------------------------------------------------


def test_custom_corpus_reads_text_lines_tables_and_optional_sources(tmp_path: Path):
    write(tmp_path, "c/a.txt", "one doc\n\n  two   doc \n")
    write(tmp_path, "c/b.jsonl", '{"body": "three"}\n{"body": "one doc"}\n')
    write(tmp_path, "c/c.csv", "body,x\nfour,1\n")
    cfg = {
        "name": "custom",
        "root": str(tmp_path),
        "format": "auto",
        "text_column": "body",
        "paths": ["c/a.txt", "c/b.jsonl", "c/c.csv"],
        "sources": [{"path": "c/missing.txt", "format": "text_lines", "required": False}],
    }
    texts, info = load_corpus(cfg, "/unused")
    assert texts == ["one doc", "two   doc", "three", "one doc", "four"]
    assert info["missing_sources"] == ["c/missing.txt"]
    assert [s["format"] for s in info["sources"]] == ["text_lines", "jsonl", "csv"]
    kept, stats = build_corpus(texts, exclude=["THREE!"])
    assert kept == ["one doc", "two doc", "four"]
    assert stats["leakage_removed"] == 1 and stats["duplicates_removed"] == 1
    with pytest.raises(CmmergeError, match="corpus custom: no 'sources', 'paths'"):
        load_corpus({"name": "custom", "paths": []}, tmp_path)
    with pytest.raises(CmmergeError, match="no text column 'text'; columns found: body"):
        load_corpus({**cfg, "text_column": "text", "paths": ["c/b.jsonl"]}, "/unused")


def test_leakage_key_matches_across_tokenisation():
    assert leakage_key("I can't   believe it!! 😂") == leakage_key("i can ’ t believe it 😂")
    assert leakage_key("Café") == leakage_key("CAFE\u0301")
    kept, stats = build_corpus(
        ["😂😂", "I can ’ t believe it", "other"], exclude=["😂😂", "I can't believe it!"]
    )
    assert kept == ["other"] and stats["leakage_removed"] == 2


def test_sample_corpora_are_free_of_every_benchmark_evaluation_text():
    eval_texts: set[str] = set()
    for name in (
        "sentiment-en-hi",
        "sentiment-en-es",
        "hate-en-hi",
        "sentiment-en-ta",
        "sentiment-en-ml",
    ):
        ds = load_task(load_task_config(name), samples_root())
        eval_texts |= {normalize_text(t) for s in ("validation", "test") for t in ds[s]["text"]}
    for corpus in ("en-hi", "en-es"):
        cfg = load_task_config  # noqa: F841 - corpus configs come from the package
        from cmmerge.presets import load_group_config, plain

        raw, info = load_corpus(plain(load_group_config("corpus", corpus)), samples_root())
        kept, stats = build_corpus(raw, eval_texts)
        assert not {leakage_key(t) for t in kept} & {leakage_key(t) for t in eval_texts} - {""}
        assert stats["kept"] == len(kept) > 4000
        assert len(info["missing_sources"]) == (1 if corpus == "en-hi" else 2)
    en = load_task(load_task_config("english-sentiment-en-hi"), samples_root())
    assert not {normalize_text(t) for t in en["train"]["text"]} & eval_texts


def test_code_mixing_index_and_percentiles():
    tags = [Counter({"Eng": 2, "Hin": 2, "O": 1}), Counter({"Eng": 3}), Counter({"O": 4})]
    mix = code_mixing(tags, {"Eng": "en", "Hin": "hi"})
    assert mix == {
        "tagged_tokens": 12,
        "language_share": {"en": 5 / 7, "hi": 2 / 7} | {"en": 0.7143, "hi": 0.2857},
        "other_share": 0.4167,
        "cmi_mean": 25.0,
        "mixed_texts_share": 0.5,
    }
    assert code_mixing([Counter()], {"Eng": "en"}) == {}
    assert length_percentiles([1, 2, 3, 4, 100]) == {
        "p50": 3.0,
        "p90": 61.6,
        "p95": 80.8,
        "p99": 96.16,
        "max": 100,
        "mean": 22.0,
    }
    assert split_overlap({"train": ["a", "b", "b "], "test": ["b", "c"]}) == {
        "train&test": 1,
        "train_duplicates": 1,
        "test_duplicates": 0,
    }


class CountingTokenizer:
    """A whitespace tokenizer that counts its calls (stands in for a Hugging Face tokenizer)."""

    all_special_tokens = ["<s>"]
    name_or_path = "counting"

    def __init__(self) -> None:
        self.calls = 0
        self.backend_tokenizer = self

    def to_str(self) -> str:
        return '{"model": "whitespace-v1", "truncation": null}'

    def __call__(self, texts, truncation=False, max_length=None):
        self.calls += 1
        ids = [
            [0, *range(1, len(t.split()) + 1)][: max_length if truncation else None] for t in texts
        ]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


def test_tokenisation_is_cached_on_disk(tmp_path: Path):
    ds = datasets.Dataset.from_dict({"text": ["a b c", "d", "e f"] * 700})
    tok = CountingTokenizer()
    first = tokenize_cached(ds, tok, 3, tmp_path)
    assert tok.calls == 3  # batches of 1,000
    second = tokenize_cached(ds, tok, 3, tmp_path)
    assert tok.calls == 3 and second["input_ids"] == first["input_ids"]
    assert first["input_ids"][:3] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 1
    tokenize_cached(ds, tok, 8, tmp_path)  # another max_length: another cache file
    assert tok.calls == 6
