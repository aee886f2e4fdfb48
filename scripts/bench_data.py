"""Measure loading and tokenising a task's train split: first run (tokenises) and second run
(loads the ``datasets.map`` cache file).

Usage::

    python scripts/bench_data.py [--data-root ../shared/data] [--task sentiment-en-hi]
        [--tokenizer DIR] [--max-length 128] [--cache DIR]

``--tokenizer`` defaults to the tiny-xlmr model's tokenizer (built offline into $CMMERGE_CACHE).
The cache folder defaults to a fresh temporary folder, so the first run is a cold one. Prints one
JSON object with the timings in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_tokenizer_dir() -> Path:
    """The tiny-xlmr model folder (built and cached on first use)."""
    from hydra import compose, initialize_config_module

    from cmmerge.config.inputs import resolve_model

    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        return resolve_model(compose(config_name="data", overrides=["model=tiny-xlmr"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--task", default="sentiment-en-hi")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)

    from cmmerge.data import load_task, load_task_config
    from cmmerge.data.stats import tokenize_cached
    from cmmerge.models.loading import load_tokenizer

    t0 = time.perf_counter()
    train = load_task(load_task_config(args.task), args.data_root)["train"]
    t_load = time.perf_counter() - t0
    tok_dir = args.tokenizer or default_tokenizer_dir()
    tokenizer = load_tokenizer(tok_dir)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="cmmerge-bench-"))
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        ds = tokenize_cached(train, tokenizer, args.max_length, cache)
        timings.append(time.perf_counter() - t0)
    n_tokens = sum(len(x) for x in ds["input_ids"])
    print(
        json.dumps(
            {
                "task": args.task,
                "data_root": str(args.data_root),
                "texts": len(train),
                "tokens": n_tokens,
                "tokenizer": str(tok_dir),
                "max_length": args.max_length,
                "cache": str(cache),
                "load_s": round(t_load, 3),
                "tokenize_first_s": round(timings[0], 3),
                "tokenize_second_s": round(timings[1], 3),
                "texts_per_s_first": round(len(train) / timings[0]),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
