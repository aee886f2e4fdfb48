"""Is a decoder folder really pretrained? Held-out perplexity and a greedy continuation.

Prints, for ~200 SentiMix Hinglish test tweets and ~200 (mostly) English tweets (the
``english-sentiment-en-hi`` test split: SentiMix tweets whose tagged words are >= 80% English):

- per-text perplexity with BOS (as the model was trained), and without it;
- the loss of the same texts packed into blocks of ``--block`` tokens as ``cmmerge cpt`` packs
  them (whole documents after BOS), and as it packed them before (concatenated and cut, blocks
  starting mid-text without BOS), so the cost of cutting shows;
- a greedy continuation of an English and a Hinglish prompt.

A random-initialised model of the same vocabulary would score a perplexity near the vocabulary
size (262,144 for Gemma-3); a pretrained one scores in the tens to hundreds on tweets.

Usage::

    python scripts/gemma_check.py /work/gemma3_270m --data-root /work/shared/data
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cmmerge.data.tasks import load_task
from cmmerge.evaluation.prompting import check_verbalizers, verbalizer_list
from cmmerge.presets import load_group_config, plain
from cmmerge.training.losses import IGNORE_INDEX, causal_lm_loss
from cmmerge.training.packing import pack_examples

PROMPTS = ["The capital of France is", "yaar aaj ka match"]
PROMPT_TEMPLATE = "Tweet: {text}\nSentiment:"  # cmmerge prompt's default prompt.template


def texts_of(task: str, data_root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` test texts of ``task`` (a seeded sample, in file order)."""
    test = load_task(plain(load_group_config("task", task)), data_root)["test"]
    keep = sorted(random.Random(seed).sample(range(len(test)), min(n, len(test))))
    return [test[i]["text"] for i in keep]


def per_text_nll(model, tokenizer, texts: list[str], bos: bool, max_length: int) -> tuple:
    """(summed NLL, predicted tokens) over ``texts`` scored one text per row. The first real
    token is predicted from BOS when ``bos``; without BOS it is only context."""
    total, count = 0.0, 0
    for i in range(0, len(texts), 8):
        enc = tokenizer(texts[i : i + 8], truncation=True, max_length=max_length)
        rows = [ids if bos else ids[1:] for ids in enc["input_ids"]]  # ids[0] is BOS
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(nll)
        count += int(labels.ne(IGNORE_INDEX).sum())
    return total, count


def packed_loss(model, tokenizer, texts: list[str], block: int, cut: bool = False) -> float:
    """Mean next-token loss of ``texts`` packed as ``cmmerge cpt`` packs them, or (``cut``) as
    it did before it packed after BOS: concatenated and cut into blocks."""
    ids = tokenizer(texts, truncation=True, max_length=block)["input_ids"]
    options = {} if cut else pack_options(model, tokenizer)
    packed = pack_examples({"input_ids": ids}, block, **options)
    total, count = 0.0, 0
    for i in range(0, len(packed["input_ids"]), 4):
        batch = {k: torch.tensor(v[i : i + 4]) for k, v in packed.items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            n = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
            total += float(causal_lm_loss(model, batch, labels, num_items_in_batch=n)) * n
        count += n
    return total / count


def pack_options(model, tokenizer) -> dict:
    """The keyword arguments ``cmmerge cpt`` gives :func:`pack_examples` for this model."""
    from cmmerge.training.packing import packing_options

    return packing_options(tokenizer, model.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--block", type=int, default=128, help="CPT block size (max_length)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
        f"vocabulary {model.config.vocab_size}, loaded in {time.time() - started:.0f} s"
    )
    print(
        f"BOS {tokenizer.bos_token!r} ({tokenizer.bos_token_id}), padding "
        f"{tokenizer.padding_side}, chat template: {tokenizer.chat_template is not None}"
    )
    sets = {
        "Hinglish (sentiment-en-hi test)": texts_of("sentiment-en-hi", args.data_root, args.n),
        "English (english-sentiment-en-hi test)": texts_of(
            "english-sentiment-en-hi", args.data_root, args.n
        ),
    }
    print(
        f"\n{'texts':40} {'n':>4} {'tokens':>7} {'ppl+BOS':>9} {'ppl-BOS':>9} "
        f"{'packed':>9} {'cut':>9}"
    )
    for name, texts in sets.items():  # perplexities: exp(mean NLL per predicted token)
        t0 = time.time()
        nll, count = per_text_nll(model, tokenizer, texts, True, args.max_length)
        nll_nobos, count_nobos = per_text_nll(model, tokenizer, texts, False, args.max_length)
        packed = packed_loss(model, tokenizer, texts, args.block)
        cut = packed_loss(model, tokenizer, texts, args.block, cut=True)
        print(
            f"{name:40} {len(texts):4d} {count:7d} {math.exp(nll / count):9.1f} "
            f"{math.exp(nll_nobos / count_nobos):9.1f} {math.exp(packed):9.1f} "
            f"{math.exp(cut):9.1f}"
            f"   ({time.time() - t0:.0f} s)"
        )
    prompt = PROMPT_TEMPLATE.format(text=sets["Hinglish (sentiment-en-hi test)"][0])
    verbalizers = verbalizer_list(["negative", "neutral", "positive"], None)
    verb_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    odd = check_verbalizers(tokenizer, prompt, verbalizers, verb_ids)
    pairs = zip(verbalizers, verb_ids, strict=True)
    shown = {v: tokenizer.convert_ids_to_tokens(ids) for v, ids in pairs}
    print(f"\nprompt verbalisers {shown}: {'as in running text' if not odd else 'MISMATCH'}")
    print("\ngreedy continuations (20 new tokens):")
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"  {prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
