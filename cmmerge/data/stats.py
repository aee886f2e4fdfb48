"""What a person checks before training: token lengths, code-mixing, split overlap; cached
tokenisation through ``datasets.map(batched=True)``."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from cmmerge.data.corpus import normalize_text

PERCENTILES = (50, 90, 95, 99)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what the tokenizer does: its class, special tokens and vocabulary files."""
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.all_special_tokens}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the truncation / padding state changes with each call: left out
        state = {
            k: v
            for k, v in json.loads(backend.to_str()).items()
            if k not in ("truncation", "padding")
        }
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # slow tokenizer: the files it was loaded from
        folder = Path(str(getattr(tokenizer, "name_or_path", "")))
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in (".json", ".model", ".txt") and path.is_file():
                h.update(path.name.encode() + path.read_bytes())
        h.update(str(tokenizer.get_vocab() if not folder.is_dir() else "").encode())
    return h.hexdigest()[:16]


def tokenize_cached(
    ds: datasets.Dataset,
    tokenizer,
    max_length: int | None,
    cache_dir: str | Path | None,
    text_column: str = "text",
    batch_size: int = 1000,
    **tokenizer_kwargs: Any,
) -> datasets.Dataset:
    """Tokenise ``ds[text_column]`` with ``datasets.map(batched=True)``, cached on disk.

    Only the text column is tokenised and cached; the other columns (labels, ...) are attached
    to the result afterwards, so the cache depends on nothing but the texts, the tokenizer and
    its arguments: a relabelled data set with the same texts re-uses the tokens and keeps its
    new labels. An in-memory data set has no cache of its own in ``datasets``, hence the
    explicit file name.

    Args:
        ds: Data set with a string column ``text_column`` (other columns are kept).
        tokenizer: A Hugging Face tokenizer.
        max_length: Truncation length; ``None`` keeps every token.
        cache_dir: Folder of the cache files; ``None`` tokenises in memory without a cache.
        text_column: The column to tokenise.
        batch_size: Texts per tokenizer call.
        **tokenizer_kwargs: More tokenizer arguments (part of the cache key), e.g.
            ``return_special_tokens_mask=True``.

    Returns:
        ``ds`` with the tokenizer's outputs (``input_ids``, ``attention_mask``, ...) added.
    """

    def encode(batch):
        return tokenizer(
            batch[text_column],
            truncation=max_length is not None,
            max_length=max_length,
            **tokenizer_kwargs,
        )

    texts = ds.select_columns([text_column])
    if cache_dir is None:
        tokens = texts.map(
            encode,
            batched=True,
            batch_size=batch_size,
            keep_in_memory=True,
            remove_columns=[text_column],
        )
    else:
        extra = sorted(tokenizer_kwargs.items())
        key = f"{tokenizer_fingerprint(tokenizer)}|{max_length}|{extra}"
        h = hashlib.sha256(key.encode())
        for text in texts[text_column]:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        folder = Path(cache_dir) / "tokenized"
        folder.mkdir(parents=True, exist_ok=True)
        tokens = texts.map(
            encode,
            batched=True,
            batch_size=batch_size,
            load_from_cache_file=True,
            remove_columns=[text_column],
            cache_file_name=str(folder / f"tokens-{h.hexdigest()[:24]}.arrow"),
            desc="tokenising",
        )
    clash = [c for c in tokens.column_names if c in ds.column_names]
    return datasets.concatenate_datasets([ds.remove_columns(clash), tokens], axis=1)


def length_percentiles(lengths: Sequence[int]) -> dict[str, float]:
    """``{p50, p90, p95, p99, max, mean}`` of token counts (empty input gives ``{}``)."""
    if len(lengths) == 0:
        return {}
    values = np.asarray(lengths)
    out = {f"p{p}": round(float(np.percentile(values, p)), 4) for p in PERCENTILES}
    out.update(max=int(values.max()), mean=round(float(values.mean()), 2))
    return out


def token_lengths(texts: Sequence[str], tokenizer, cache_dir: str | Path | None) -> dict:
    """Token length percentiles of ``texts`` (special tokens included, no truncation)."""
    ds = datasets.Dataset.from_dict({"text": list(texts)})
    ids = tokenize_cached(ds, tokenizer, None, cache_dir)["input_ids"]
    return length_percentiles([len(x) for x in ids])


def code_mixing(
    tag_counts_per_text: Iterable[Mapping[str, int]], language_tags: Mapping[str, str]
) -> dict:
    """Share of tokens per language, and the code-mixing index, from word-level tags.

    Tags not in ``language_tags`` (punctuation, emoji, names) count as *other*. The CMI of one
    text is ``100 * (1 - max_lang / n_lang)`` over its language-tagged tokens (Gambäck and Das
    2014, 0 for a monolingual text); ``cmi_mean`` averages it over texts with such tokens.

    Returns:
        ``{}`` when no text has tags, else ``{tagged_tokens, language_share: {lang: share},
        other_share, cmi_mean, mixed_texts_share}``.
    """
    totals: Counter[str] = Counter()
    other = 0
    cmis: list[float] = []
    mixed = 0
    for counts in tag_counts_per_text:
        langs: Counter[str] = Counter()
        for tag, n in counts.items():
            if tag in language_tags:
                langs[language_tags[tag]] += n
            else:
                other += n
        totals.update(langs)
        n_lang = sum(langs.values())
        if n_lang:
            cmis.append(100.0 * (1 - max(langs.values()) / n_lang))
            mixed += len(langs) > 1
    n_lang_tokens = sum(totals.values())
    if n_lang_tokens + other == 0:
        return {}
    return {
        "tagged_tokens": n_lang_tokens + other,
        "language_share": {
            k: round(v / max(n_lang_tokens, 1), 4) for k, v in sorted(totals.items())
        },
        "other_share": round(other / (n_lang_tokens + other), 4),
        "cmi_mean": round(float(np.mean(cmis)), 2) if cmis else 0.0,
        "mixed_texts_share": round(mixed / len(cmis), 4) if cmis else 0.0,
    }


def split_overlap(splits: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Distinct normalised texts shared by each pair of splits, and duplicates within each."""
    norm = {name: [normalize_text(t) for t in texts] for name, texts in splits.items()}
    sets = {name: set(texts) for name, texts in norm.items()}
    names = list(norm)
    out = {f"{a}&{b}": len(sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    out.update({f"{name}_duplicates": len(norm[name]) - len(sets[name]) for name in names})
    return out
