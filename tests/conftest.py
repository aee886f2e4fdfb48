"""Shared fixtures: an isolated model cache, offline hub, and composed configs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The library settings the command sets before it imports them when stderr is no terminal
# (cli._quiet_libraries): commands run in this process print what they print in their own.
for _key, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DATASETS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
):
    os.environ.setdefault(_key, _value)
# One thread per test process (and the processes tests start), set before torch is imported: the
# tiny models gain nothing from more, and two threads on a shared or busy machine (or with
# `pytest -n 2`) make every training step several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Fast settings for the tiny models: a few CPT steps, one short fine-tuning epoch.
FAST = [
    "train=smoke",
    "cpt.max_steps=8",
    "cpt.batch_size=16",
    "cpt.max_length=32",
    "finetune.epochs=1",
    "finetune.max_length=32",
    "evaluate.max_length=32",
]


def tiny_llama(vocab: int, tied: bool = True, **config: object):
    """A 2-layer Llama of hidden size 32, random weights from torch's current seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            **config,
        )
    )


def xlmr_pair(
    root: Path, vocab: int = 100, hidden: int = 32, layers: int = 2, intermediate: int = 64
) -> Path:
    """A tiny XLM-R masked LM in ``root/base`` and a perturbed copy in ``root/tuned``."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=40,
    )
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(config)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    model.save_pretrained(root / "tuned")
    return root


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are built once per test session into a private cache."""
    cache = Path(os.environ.get("CMMERGE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["CMMERGE_CACHE"] = str(cache)
    return cache


def compose(stage: str, overrides: list[str] | None = None):
    """The composed config of ``stage`` with ``overrides``, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=list(overrides or []))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``n`` torch threads in this process for the block (``None``: as they are); in-process
    runs that are compared bit for bit with runs of processes under OMP_NUM_THREADS=1 use 1."""
    if n is None:
        yield
        return
    from cmmerge.merging.threads import torch_threads as set_for_block

    with set_for_block(n):
        yield


@contextlib.contextmanager
def _process_warnings(err: io.StringIO):
    """Warnings as a new Python process shows them (its default filters), printed to ``err``
    (pytest would otherwise record them): a command's stderr is checked for stray lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=ResourceWarning)
        try:
            yield
        finally:
            for w in caught:
                err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))


def cmmerge(
    *args: str, cwd: Path | str | None = None, threads: int | None = None
) -> subprocess.CompletedProcess:
    """``cmmerge *args`` run in this process by ``cmmerge.cli.main`` (no new interpreter to
    start): its exit status, stdout and stderr as a finished subprocess would give them. An
    exception that escapes is printed with its traceback and gives status 1, as Python does."""
    from cmmerge import cli

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, before = root.handlers[:], root.level, os.getcwd()
    code: int | str | None = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            torch_threads(threads),
            _process_warnings(err),
        ):
            try:
                cli.main(list(args))
            except SystemExit as done:
                code = done.code
            except Exception:  # noqa: BLE001 - as an uncaught exception ends a process
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
        for handler in root.handlers:  # Hydra's job logging: its file and stdout handlers
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=err)
        code = 1
    return subprocess.CompletedProcess(
        ["cmmerge", *args], code or 0, out.getvalue(), err.getvalue()
    )


def cmmerge_process(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``cmmerge *args`` in a new Python process, for tests where the separate process is the
    point (a kill, a fresh interpreter, the installed entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "cmmerge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
