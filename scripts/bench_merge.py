"""Benchmark: cmmerge vs mergekit on the same one-source TIES merge, whole process each.

Builds random checkpoints of real shapes (an XLM-R-base float32 pair; a Llama-3.2-1B bfloat16
pair with tied embeddings; the second of each pair = the first + noise) under ``--workdir``
(never the repository), then runs ``cmmerge merge`` and ``mergekit-yaml`` as child processes,
``--runs`` times each after ``--warmup`` untimed runs (page cache), interleaving the tools and
flushing earlier outputs to disk before each run (no run pays for another's writeback), and
reports the median wall time and peak RSS (``ru_maxrss`` of the child) and the ratios as a
Markdown table. A benchmark, not a test::

    python scripts/bench_merge.py --shapes xlmr,llama --runs 3 --workdir /tmp/cmmerge-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "xlmr": {
        "label": "XLM-R-base, float32",
        "dtype": "float32",
        "config": {
            "model_type": "xlm-roberta",
            "architectures": ["XLMRobertaForMaskedLM"],
            "vocab_size": 250002,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    },
    "llama": {
        "label": "Llama-3.2-1B, bfloat16, tied",
        "dtype": "bfloat16",
        "config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    },
}
DENSITY, LAMBDA = 0.2, 0.5


def build_pair(shape: str, root: Path) -> tuple[Path, Path]:
    """Write ``base`` and ``tuned`` (= base + noise) checkpoints of ``shape`` under ``root``."""
    import torch
    import transformers
    from safetensors.torch import save_file

    base, tuned = root / shape / "base", root / shape / "tuned"
    if (tuned / "model.safetensors").exists():
        return base, tuned
    spec = SHAPES[shape]
    cfg_dict = dict(spec["config"])
    config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    config.dtype = spec["dtype"]
    arch = getattr(transformers, spec["config"]["architectures"][0])
    with torch.device("meta"):
        model = arch(config)
    # the keys save_pretrained writes: every parameter, tied outputs stored once, under the
    # input embeddings' name
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {})
        if config.tie_word_embeddings
        else set()
    )
    shapes = {
        k: tuple(p.shape)
        for k, p in model.named_parameters(remove_duplicate=False)
        if k not in tied
    }
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    for d in (base, tuned):
        d.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(d)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    for k, t in tensors.items():
        tensors[k] = (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(dtype)
    save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def commands(tool: str, base: Path, tuned: Path, out: Path, dtype: str) -> list[str]:
    """The command line that runs ``tool`` on the benchmark merge."""
    if tool == "cmmerge":
        return [
            sys.executable,
            "-m",
            "cmmerge.cli",
            "merge",
            f"base={base}",
            f"models=[{tuned}]",
            "method=ties",
            f"lambda={LAMBDA}",
            f"density={DENSITY}",
            f"output={out}",
            f"run.root={out.parent / 'runs'}",
            f"dtype={dtype}",  # the same output dtype as mergekit's (cmmerge's default: float32)
        ]
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n"
        f"    parameters: {{weight: 1.0, density: {DENSITY}}}\n"
        f"parameters: {{lambda: {LAMBDA}}}\ndtype: {dtype}\n"
    )
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    return [mergekit, str(config), str(out), "--quiet", "--no-copy-tokenizer"]


def run_once(cmd: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process, from its own ``wait4`` rusage."""
    shutil.rmtree(out, ignore_errors=True)
    # the outputs of earlier runs (GBs of dirty pages) are flushed first: no run pays for the
    # writeback of another's output
    os.sync()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{log.read_text()[-2000:]}")
    return wall, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="xlmr,llama", help="comma list: xlmr,llama")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per tool first")
    parser.add_argument("--tools", default="cmmerge,mergekit", help="comma list")
    parser.add_argument("--workdir", default="/tmp/cmmerge-bench", help="checkpoints go here")
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.workdir)
    if args.build:
        build_pair(args.build, root)
        return
    tools = args.tools.split(",")
    rows, raw = [], {}
    for shape in args.shapes.split(","):
        # built in a child: a forked child inherits the parent's peak RSS (ru_maxrss)
        subprocess.run(
            [sys.executable, __file__, "--build", shape, "--workdir", str(root)], check=True
        )
        base, tuned = root / shape / "base", root / shape / "tuned"
        cmds = {
            tool: commands(tool, base, tuned, root / shape / f"out-{tool}", SHAPES[shape]["dtype"])
            for tool in tools
        }
        for tool in tools:  # untimed: reads the checkpoints into the page cache for every tool
            for _ in range(args.warmup):
                run_once(cmds[tool], root / shape / f"out-{tool}")
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in tools}
        for _ in range(args.runs):  # interleaved: a slow spell of the machine hits every tool
            for tool in tools:
                runs[tool].append(run_once(cmds[tool], root / shape / f"out-{tool}"))
        med = {}
        for tool in tools:
            raw[f"{shape}/{tool}"] = runs[tool]
            med[tool] = (
                statistics.median(r[0] for r in runs[tool]),
                statistics.median(r[1] for r in runs[tool]),
            )
            print(
                f"{shape} {tool}: " + ", ".join(f"{w:.1f} s / {m:.2f} GB" for w, m in runs[tool]),
                file=sys.stderr,
                flush=True,
            )
            shutil.rmtree(root / shape / f"out-{tool}", ignore_errors=True)
        for tool in tools:
            ratio = ""
            if tool != "mergekit" and "mergekit" in med:
                ratio = (
                    f"{med['mergekit'][0] / med[tool][0]:.1f}x faster, "
                    f"{med['mergekit'][1] / med[tool][1]:.1f}x less memory"
                )
            rows.append(
                f"| {SHAPES[shape]['label']} | {tool} | {med[tool][0]:.1f} | "
                f"{med[tool][1]:.2f} | {ratio} |"
            )
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    print(
        f"One-source ties, density {DENSITY}, lambda {LAMBDA}; median of {args.runs} runs; "
        f"{cpus} CPUs, {mem:.0f} GB RAM, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}\n"
    )
    print("| checkpoint | tool | wall (s) | peak RSS (GB) | vs mergekit |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
