"""Benchmark a CPT training step: cmmerge's fast losses against the default transformers classes.

One step = forward + backward + AdamW step on the same seeded batches. Every (variant, run) is a
fresh subprocess, so peak RSS is the whole process (model load included); runs are interleaved
across variants and reported as medians, with the fast/default ratios from the same invocation.

* ``mlm``: multilingual-e5-small (BERT, XLM-R vocabulary of 250k) as ``BertForMaskedLM``, batch
  32 x 48, 15% of positions masked; default = the model's forward with labels, fast =
  :func:`cmmerge.training.losses.masked_lm_loss`.
* ``clm``: a random Llama-shaped decoder (hidden 512, 4 layers, vocabulary 128256, tied
  embeddings), batch 8 x 256; default = the model's forward with labels, fast =
  :func:`cmmerge.training.losses.causal_lm_loss` (chunked).

``--device cuda --precision bf16`` times the same steps on a GPU (bf16 autocast, peak memory
from ``torch.cuda.max_memory_allocated``); ``--random-init`` builds me5-small from its
``config.json`` alone (random weights: the same step time), for machines that hold no weights;
``--clm-shape llama1b`` uses Llama-3.2-1B's shape (hidden 2048, 16 layers) for the decoder;
``--gemma DIR`` the real Gemma-3-270M folder of ``scripts/make_gemma3_270m.sh`` (vocabulary
262,144, tied: the head is most of the step). A
variant may name its own precision (``mlm-fast@bf16``); ratios are always against the default
class at ``--precision``.

Usage::

    /work/shared/tools/me5_small/make_me5_small.sh /tmp/me5_small
    python scripts/bench_cpt.py --me5 /tmp/me5_small --runs 3 --steps 3
    python scripts/bench_cpt.py --me5 /tmp/me5_small --runs 3 --steps 3 \
        --variants mlm-default,mlm-fast,mlm-default@bf16,mlm-fast@bf16
    python scripts/bench_cpt.py --me5 DIR --random-init --device cuda --precision bf16 \
        --mlm-batch 128 --mlm-length 128 --clm-shape llama1b --clm-length 1024
    python scripts/bench_cpt.py --gemma /tmp/gemma3_270m --variants clm-default,clm-fast \
        --clm-batch 8 --clm-length 64 --runs 3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("mlm-default", "mlm-fast", "clm-default", "clm-fast")
CLM_SHAPES = {
    "small": dict(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1536,
        max_position_embeddings=1024,
    ),
    "llama1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        max_position_embeddings=4096,
    ),
}


def _mlm_setup(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the e5 folder has no MLM head: it is initialised
    torch.manual_seed(0)
    if args.random_init:
        from transformers import AutoConfig

        model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(args.me5))
    else:
        model = AutoModelForMaskedLM.from_pretrained(args.me5, dtype="float32")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        ids = torch.randint(5, vocab, (args.mlm_batch, args.mlm_length), generator=g)
        pick = torch.rand(ids.shape, generator=g) < 0.15
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        inputs = {
            "input_ids": ids.masked_fill(pick, 4),
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
        }
        batches.append((inputs, labels))
    return model, batches


def _clm_setup(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.gemma:  # the real Gemma-3-270M folder (scripts/make_gemma3_270m.sh)
        model = AutoModelForCausalLM.from_pretrained(args.gemma, dtype="float32")
        config = model.config
    else:
        config = LlamaConfig(
            vocab_size=128256, tie_word_embeddings=True, **CLM_SHAPES[args.clm_shape]
        )
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        ids = torch.randint(3, config.vocab_size, (args.clm_batch, args.clm_length), generator=g)
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()))
    return model, batches


def parse_variant(variant: str, args: argparse.Namespace) -> tuple[str, str, str]:
    """``mlm-fast`` or ``mlm-fast@bf16`` -> (objective, implementation, precision)."""
    name, _, precision = variant.partition("@")
    objective, impl = name.split("-")
    return objective, impl, precision or args.precision


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.steps`` timed steps (after one warm-up step) of one variant; returns figures."""
    import torch

    from cmmerge.training.losses import causal_lm_loss, masked_lm_loss

    objective, impl, precision = parse_variant(variant, args)
    model, batches = (_mlm_setup if objective == "mlm" else _clm_setup)(args)
    device = torch.device(args.device)
    model.to(device).train()
    batches = [({k: v.to(device) for k, v in b.items()}, lab.to(device)) for b, lab in batches]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the Trainer's default optimizer (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)

    def step(inputs: dict, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if impl == "default":
                loss = model(**inputs, labels=labels).loss
            elif objective == "mlm":
                loss = masked_lm_loss(model, inputs, labels)[0]
            else:
                loss = causal_lm_loss(model, inputs, labels, chunk_size=args.chunk_size)
        loss.backward()
        optimizer.step()
        return float(loss)

    first_loss = step(*batches[0])  # warm-up: allocates the optimizer state
    times, cpu = [], []
    for inputs, labels in batches[1:]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(inputs, labels)
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    tokens = batches[0][1].numel()
    sec = statistics.median(times)
    return {
        "variant": variant,
        "step_s": sec,
        "tokens_per_s": tokens / sec,
        "step_cpu_s": statistics.median(cpu),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        ),
        "first_loss": first_loss,
        "threads": torch.get_num_threads(),
    }


def _run_worker(variant: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    mem_key, mem_name = ("peak_gpu_mb", "GPU") if args.device == "cuda" else ("peak_rss_mb", "RSS")
    rows = [
        f"| objective | setting | variant | step s | step CPU s | tokens/s | peak {mem_name} MB |"
        f" loss step 1 | tokens/s vs default | peak {mem_name} vs default |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    settings = {
        "mlm": f"me5-small BertForMaskedLM, {args.mlm_batch} x {args.mlm_length}",
        "clm": (
            f"Gemma-3-270M V262144 tied, {args.clm_batch} x {args.clm_length}"
            if args.gemma
            else f"Llama {args.clm_shape} V128256 tied, {args.clm_batch} x {args.clm_length}"
        ),
    }
    med = {
        v: {
            k: statistics.median(r[k] for r in rs)
            for k in ("step_s", "step_cpu_s", "tokens_per_s", mem_key, "first_loss")
        }
        for v, rs in results.items()
    }
    for v, m in med.items():
        objective, impl, precision = parse_variant(v, args)
        base = med.get(f"{objective}-default")  # the anchor: the default class at --precision
        speed = f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{m[mem_key] / base[mem_key]:.2f}x" if base else "-"
        name = "transformers default" if impl == "default" else "cmmerge fast loss"
        if objective == "clm" and impl == "fast":
            name += f" (chunk {args.chunk_size})"
        name += f", {precision}"
        rows.append(
            f"| {objective.upper()} | {settings[objective]} | {name} | {m['step_s']:.2f} |"
            f" {m['step_cpu_s']:.2f} | {m['tokens_per_s']:.0f} | {m[mem_key]:.0f} |"
            f" {m['first_loss']:.5f} |"
            f" {speed} | {mem} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--me5", default="/tmp/me5_small", help="multilingual-e5-small folder")
    parser.add_argument("--runs", type=int, default=3, help="processes per variant")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--mlm-batch", type=int, default=32)
    parser.add_argument("--mlm-length", type=int, default=48)
    parser.add_argument("--clm-batch", type=int, default=8)
    parser.add_argument("--clm-length", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--clm-shape", choices=sorted(CLM_SHAPES), default="small")
    parser.add_argument("--gemma", default=None, help="clm on this Gemma-3-270M folder instead")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--random-init", action="store_true", help="me5 from config.json only")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    variants = [v for v in args.variants.split(",") if v]
    if any(v.startswith("mlm") for v in variants) and not (Path(args.me5) / "config.json").exists():
        sys.exit(f"no model in {args.me5}: build it with make_me5_small.sh (see the docstring)")
    argv = [
        f"--me5={args.me5}",
        f"--steps={args.steps}",
        f"--mlm-batch={args.mlm_batch}",
        f"--mlm-length={args.mlm_length}",
        f"--clm-batch={args.clm_batch}",
        f"--clm-length={args.clm_length}",
        f"--chunk-size={args.chunk_size}",
        f"--clm-shape={args.clm_shape}",
        *([f"--gemma={args.gemma}"] if args.gemma else []),
        f"--device={args.device}",
        f"--precision={args.precision}",
        *(["--random-init"] if args.random_init else []),
    ]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    load = os.getloadavg()
    for run in range(args.runs):
        for v in variants:  # interleaved, so load from other processes hits both alike
            r = _run_worker(v, argv)
            results[v].append(r)
            print(
                f"run {run + 1}/{args.runs} {v}: {r['step_s']:.2f} s/step, "
                f"{r['tokens_per_s']:.0f} tokens/s, {r['peak_rss_mb']:.0f} MB RSS, "
                f"{r['peak_gpu_mb']:.0f} MB GPU",
                file=sys.stderr,
            )
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"torch {torch.__version__}, {results[variants[0]][0]['threads']} threads; "
        f"median of {args.runs} processes x {args.steps} steps (fused AdamW, {args.precision}); "
        f"load average before: {load[0]:.1f}\n"
    )
    print(_table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
