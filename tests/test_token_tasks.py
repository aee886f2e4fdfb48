"""Token-level tasks (word-level language identification): tag alignment on sub-tokens, word
metrics, the lid-en-hi arm end to end from a merged model, custom CoNLL token files, and bad
token files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, compose
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from transformers import AutoModelForTokenClassification

from cmmerge.commands import cpt, evaluate, extract, finetune, merge
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import cpt_corpus, evaluation_texts, task_splits_with_info
from cmmerge.data.corpus import normalize_text
from cmmerge.data.tasks import load_task_with_info
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.baseline import majority_macro_f1
from cmmerge.evaluation.token_metrics import token_metrics
from cmmerge.reporting.stats import macro_f1
from cmmerge.reporting.study import _evaluation
from cmmerge.training.token_classification import (
    IGNORE,
    aligned_labels,
    tokenize_words,
    word_chunks,
    word_predictions,
)

EN, HI, OTHER = 0, 1, 2


@pytest.fixture(scope="module")
def wordpiece():
    """A hand-made WordPiece tokenizer: 'bhai' is bh + ##ai, 'yaarr' is yaar + ##r."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "kya", "bh", "##ai", "love", "yaar", "##r", "!"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _chunks(words, labels, tokenizer, max_length):
    import datasets

    ds = datasets.Dataset.from_dict({"words": words})
    chunks = tokenize_words(ds, tokenizer, max_length)
    return chunks, aligned_labels(chunks, labels)


def test_word_tags_sit_on_the_first_sub_token_only(wordpiece):
    words = [["kya", "bhai", "love", "yaarr", "!"]]
    tags = [[HI, HI, EN, HI, OTHER]]
    chunks, labels = _chunks(words, tags, wordpiece, 32)
    assert wordpiece.convert_ids_to_tokens(chunks["input_ids"][0]) == [
        "[CLS]", "kya", "bh", "##ai", "love", "yaar", "##r", "!", "[SEP]",
    ]  # fmt: skip
    #                     CLS  kya  bh  ##ai    love yaar ##r     !      SEP
    assert labels == [[IGNORE, HI, HI, IGNORE, EN, HI, IGNORE, OTHER, IGNORE]]

    # Longer than max_length: cut into chunks of whole words; every word labelled exactly once.
    chunks, labels = _chunks(words, tags, wordpiece, 5)  # 3 sub-tokens + [CLS] + [SEP]
    assert [wordpiece.convert_ids_to_tokens(ids) for ids in chunks["input_ids"]] == [
        ["[CLS]", "kya", "bh", "##ai", "[SEP]"],
        ["[CLS]", "love", "yaar", "##r", "[SEP]"],
        ["[CLS]", "!", "[SEP]"],
    ]
    assert chunks["first_word"] == [0, 2, 4] and chunks["sentence"] == [0, 0, 0]
    assert labels == [
        [IGNORE, HI, HI, IGNORE, IGNORE],
        [IGNORE, EN, HI, IGNORE, IGNORE],
        [IGNORE, OTHER, IGNORE],
    ]
    assert word_chunks([1, 2, 1, 2, 1], 3) == [(0, 2), (2, 4), (4, 5)]
    assert word_chunks([5, 1], 3) == [(0, 1), (1, 2)]  # a word longer than the budget alone

    # Predictions come back per word, from each word's first sub-token.
    logits = np.full((3, 5, 3), -5.0, dtype=np.float32)
    logits[0, 1, HI] = logits[0, 2, EN] = logits[1, 1, EN] = logits[1, 2, HI] = 5.0
    logits[2, 1, OTHER] = 5.0
    logits[0, 3, OTHER] = 9.0  # the second sub-token of 'bhai': never read
    preds, probs, missing = word_predictions(chunks, logits, [5])
    assert preds == [[HI, EN, EN, HI, OTHER]] and missing == 0
    assert np.allclose([p.sum() for p in probs[0]], 1.0)


def test_word_metrics_match_sklearn_on_the_flattened_words():
    gold = [[EN, HI, HI, OTHER], [HI, HI], [EN, OTHER, OTHER]]
    pred = [[EN, HI, EN, OTHER], [HI, EN], [HI, OTHER, HI]]
    labels = ["en", "hi", "other"]
    m = token_metrics(gold, pred, labels)
    g = [x for s in gold for x in s]
    p = [x for s in pred for x in s]
    assert m["macro_f1"] == pytest.approx(f1_score(g, p, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(g, p, average="weighted"))
    assert m["accuracy"] == pytest.approx(accuracy_score(g, p)) == pytest.approx(5 / 9)
    assert (m["n"], m["n_sentences"], m["unit"]) == (9, 3, "word")
    prec, rec, f1, support = precision_recall_fscore_support(g, p, labels=[0, 1, 2])
    for i, name in enumerate(labels):
        entry = m["per_class"][name]
        assert entry["precision"] == pytest.approx(prec[i])
        assert entry["recall"] == pytest.approx(rec[i])
        assert entry["f1"] == pytest.approx(f1[i])
        assert entry["support"] == support[i]
    assert list(m)[:3] == ["macro_f1", "accuracy", "weighted_f1"]
    assert list(m)[-2:] == ["per_class", "confusion_matrix"]
    # the report's bootstrap statistic gives the same macro-F1 on the flattened words
    assert macro_f1(np.array(g), np.array(p), 3) == pytest.approx(m["macro_f1"])
    with pytest.raises(ValueError, match="sentence 1: 2 gold words, 1 predicted"):
        token_metrics(gold, [pred[0], [HI], pred[2]], labels)


def test_lid_en_hi_from_a_merged_model_end_to_end(tmp_path):
    overrides = [
        "task=lid-en-hi",
        "init=merged",
        "method=tv",
        "lambda=0.5",
        f"run.root={tmp_path}",
        "run.name=lid",
        *FAST,
        "finetune.train_size=600",
    ]
    cfg = compose("finetune", overrides)
    cpt.run(cfg)
    extract.run(cfg)
    merge.run(cfg)
    manifest = finetune.run(cfg)
    assert manifest["arm"].startswith("TV->FT") and manifest["task"] == "lid-en-hi"
    assert manifest["data"]["lid-en-hi"]["train"]["size"] == 600
    val = manifest["metrics"]
    assert val["unit"] == "word" and set(val["per_class"]) == {"en", "hi", "other"}

    evaluate.run(compose("evaluate", overrides))
    ev = stage_dirs(cfg)["evaluate"] / "lid-en-hi"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert list(metrics)[:4] == ["split", "macro_f1", "accuracy", "weighted_f1"]
    for key in ("macro_f1", "accuracy", "weighted_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_class"]) == {"en", "hi", "other"}
    for entry in metrics["per_class"].values():
        assert all(0.0 <= entry[k] <= 1.0 for k in ("precision", "recall", "f1"))
    test = task_splits_with_info(cfg)[0]["test"]
    rows = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(test) == metrics["n_sentences"] == 300
    for row, words in zip(rows, test["words"], strict=True):
        assert row["words"] == words
        assert len(row["pred"]) == len(row["gold"]) == len(words)
        assert set(row["pred"]) <= {"en", "hi", "other"}
    assert metrics["n"] == sum(len(w) for w in test["words"])
    # The tiny model learns: better than always predicting the most frequent tag (and chance).
    support = [metrics["per_class"][t]["support"] for t in ("en", "hi", "other")]
    assert metrics["macro_f1"] > max(majority_macro_f1(support), 1 / 3) + 0.1
    # What the report reads: every word an example, the same macro-F1 as metrics.json.
    evaluation = _evaluation(ev)
    assert evaluation.gold.shape == (metrics["n"],)
    assert macro_f1(evaluation.gold, evaluation.pred, 3) == pytest.approx(metrics["macro_f1"])


def _write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")
    return path


def _custom_sentences(n: int) -> list[list[tuple[str, str]]]:
    en = ["love", "you", "the", "movie", "good"]
    hi = ["yaar", "kya", "bhai", "hai", "accha"]
    return [
        [(en[i % 5], "EN"), (hi[(i + 1) % 5], "HI"), (hi[(i + 2) % 5], "HI"), ("!", "X")]
        for i in range(n)
    ]


def test_a_custom_conll_token_task_loads_and_fine_tunes(tmp_path):
    train = _write_conll(tmp_path / "train.conll", _custom_sentences(60))
    test = _write_conll(tmp_path / "test.txt", _custom_sentences(10))
    overrides = [
        "task=custom",
        "task.type=token",
        f"task.train={train}",
        f"task.test={test}",
        "init=base",
        f"run.root={tmp_path}",
        "run.name=custom",
        *FAST,
        "finetune.max_steps=3",
    ]
    cfg = compose("finetune", overrides)
    splits, info = task_splits_with_info(cfg)
    assert {s: len(d) for s, d in splits.items()} == {"train": 54, "validation": 6, "test": 10}
    assert info["train"]["format"] == "conll_tokens" and info["test"]["words"] == 40
    assert splits["train"].features["word_labels"].feature.names == ["EN", "HI", "X"]
    assert splits["test"][0]["words"] == ["love", "kya", "bhai", "!"]
    assert splits["test"][0]["word_labels"] == [0, 1, 1, 2]
    manifest = finetune.run(cfg)
    assert manifest["metrics"]["n_sentences"] == 6
    evaluate.run(compose("evaluate", overrides))
    ev = stage_dirs(cfg)["evaluate"] / "custom"
    rows = (ev / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 10 and len(json.loads(rows[0])["pred"]) == 4

    lora = compose("finetune", [*overrides, "peft=lora"])  # LoRA with TaskType.TOKEN_CLS
    finetune.run(lora)
    ft_dir = stage_dirs(lora)["finetune"]
    assert (ft_dir / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForTokenClassification.from_pretrained(ft_dir / "model")
    assert model.num_labels == 3 and not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "body, labels, message",
    [
        ("kya\tHI\nbhai\n\nlove\tEN\n", "[EN,HI]", r"line 2: word 'bhai' has no tag"),
        ("kya\tHI\n\nlove\tEN\nyaar\tHINDI\n", "[EN,HI]", r"line 4: unknown tag\(s\) 'HINDI'"),
    ],
)
def test_a_bad_token_file_is_named_with_its_line(tmp_path, body, labels, message):
    bad = tmp_path / "bad.conll"
    bad.write_text(body)
    task = {
        "name": "custom",
        "type": "token",
        "format": "conll_tokens",
        "labels": json.loads(labels.replace("EN", '"EN"').replace("HI", '"HI"')),
        "train": str(bad),
        "validation": str(bad),
        "test": str(bad),
    }
    with pytest.raises(CmmergeError, match=message) as err:
        load_task_with_info(task, tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_task_type_is_named(tmp_path):
    task = {"name": "custom", "type": "spans", "train": "x", "test_fraction": 0.1}
    with pytest.raises(CmmergeError, match="type=spans: use sequence or token"):
        load_task_with_info(task, tmp_path)


def test_lid_splits_are_the_sentiment_splits_and_kept_out_of_cpt_corpora():
    cfg = compose("data", ["task=sentiment-en-hi"])
    assert {"lid-en-hi", "lid-en-es"} <= set(cfg.data.leakage_tasks)
    banned = evaluation_texts(cfg)
    lid = task_splits_with_info(compose("data", ["task=lid-en-es"]))[0]
    assert all(normalize_text(t) in banned for t in lid["validation"]["text"])
    # The validation tweets carved from Spanglish train are sentiment-en-es's (stratified by
    # the headers' sentiment with the same seed), so the CPT corpus loses nothing more.
    sentiment = task_splits_with_info(compose("data", ["task=sentiment-en-es"]))[0]
    for split in ("train", "validation", "test"):
        assert lid[split]["text"] == sentiment[split]["text"]


def test_l3cube_lid_evaluation_tweets_leave_the_cpt_corpus_and_its_train_tweets_stay():
    cfg = compose("data", ["task=sentiment-en-hi"])
    assert "lid-en-hi-l3cube" in cfg.data.leakage_tasks
    splits, info = task_splits_with_info(compose("data", ["task=lid-en-hi-l3cube"]))
    # The sample's 3,000 L3Cube test tweets, 80 / 10 / 10, seeded by data.split_seed.
    assert {s: len(d) for s, d in splits.items()} == {"train": 2400, "validation": 300, "test": 300}
    assert splits["train"].features["word_labels"].feature.names == ["en", "hi"]
    words = [w for ws in splits["test"]["words"] for w in ws]
    labels = [i for ids in splits["test"]["word_labels"] for i in ids]
    assert len(words) == len(labels) > 3000 and set(labels) == {0, 1}
    again = task_splits_with_info(compose("data", ["task=lid-en-hi-l3cube"]))[0]
    assert again["test"]["text"] == splits["test"]["text"]
    corpus, stats = cpt_corpus(cfg)
    held_out = {normalize_text(t) for s in ("validation", "test") for t in splits[s]["text"]}
    kept = set(corpus)
    assert not held_out & kept and stats["leakage_removed"] >= len(held_out) - 10
    train = {normalize_text(t) for t in splits["train"]["text"]}
    assert len(train & kept) > 0.95 * len(train)  # unlabelled use of training tweets
