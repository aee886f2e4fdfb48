"""Bad inputs, table-driven: each ends with one line on stderr naming what is wrong, exit status
2, no traceback, and nothing left that looks finished (no manifest, no partial folder)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose, xlmr_pair
from safetensors.torch import load_file, save_file
from test_cli import cmmerge

from cmmerge.models.loading import resolve_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = xlmr_pair(tmp_path_factory.mktemp("bad"))
    llama = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    shutil.copytree(resolve_model(compose("finetune", [])), root / "tiny")  # with a tokenizer
    shutil.copytree(root / "tiny", root / "nan")
    weights = load_file(root / "nan" / "model.safetensors")
    key = next(k for k in weights if k.startswith("roberta.encoder") and "dense.weight" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, root / "nan" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(root / "tuned", root / "nan_tuned")
    weights = load_file(root / "nan_tuned" / "model.safetensors")
    weights[key][0, 0] = float("inf")
    save_file(weights, root / "nan_tuned" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(root / "tuned", root / "truncated")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(b"x")
    (root / "tv.safetensors").write_bytes(b"not a safetensors file")
    (root / "blank.csv").write_text("text,label\n ,pos\n  ,neg\n")
    (root / "fake_run" / "finetune").mkdir(parents=True)
    return root


M = "merge"
# 36 bad inputs across the stages (the issue asks for at least 30).
CASES = [
    ("merge", ["lamda=0.5"], "did you mean lambda"),
    ("merge", ["lambda=abc"], "lambda takes a number"),
    ("finetune", ["model=nonexistent"], "unknown model 'nonexistent'"),
    ("finetune", ["task=nonexistent"], "unknown task 'nonexistent'"),
    ("merge", ["method=nonexistent"], "unknown method"),
    ("merge", ["density=1.5"], "density"),
    ("merge", ["density=0"], "density"),
    ("merge", ["method=ties", "method.sign=bogus"], "sign"),
    ("merge", ["dtype=float8"], "dtype"),
    ("merge", ["max_shard_size=abc"], "max_shard_size"),
    ("finetune", ["seed=abc"], "seed"),
    ("finetune", ["[seed=0,1,2]"], "brackets"),
    ("cpt", ["model.name_or_path=/no/such/model"], "/no/such/model"),
    ("finetune", ["init=/no/such/dir"], "/no/such/dir"),
    ("finetune", ["init=merged"], "needs cpt, extract, merge"),
    ("extract", [], "needs cpt"),
    ("evaluate", ["init=base"], "needs finetune"),
    ("data", ["data.root=/no/such/folder"], "/no/such/folder"),
    ("finetune", ["init=base", "finetune.class_weights=bogus"], "class_weights"),
    ("report", [], "nothing to report"),
    ("finetune", ["init={root}/tiny", "finetune.max_length=500"], "positions"),
    ("finetune", ["init={root}/noconfig"], "config.json"),
    ("prompt", ["model=tiny-xlmr"], "decoder"),
    (M, ["base={root}/none", "models=[{root}/tuned]", "output={root}/o"], "does not exist"),
    (M, ["base={root}/base", "models=[]", "output={root}/o"], "empty"),
    (
        M,
        [
            "base={root}/base",
            "models=[{root}/tuned]",
            "task_vectors=[{root}/tv.safetensors]",
            "output={root}/o",
        ],
        "not both",
    ),  # fmt: skip
    (
        M,
        ["base={root}/base", "task_vectors=[{root}/missing.safetensors]", "output={root}/o"],
        "does not exist",
    ),  # fmt: skip
    (M, ["base={root}/base", "models=[{root}/llama]", "output={root}/o"], "architectures differ"),
    (M, ["base={root}/base", "models=[{root}/tuned]", "output={root}/base"], "base"),
    (
        M,
        ["base={root}/base", "models=[{root}/tuned]", "weights=[1,2]", "output={root}/o"],
        "weights",
    ),  # fmt: skip
    (M, ["base={root}/noconfig", "models=[{root}/tuned]", "output={root}/o"], "config.json"),
    (M, ["base={root}/base", "models=[{root}/nan_tuned]", "output={root}/o"], "non-finite"),
    (M, ["base={root}/base", "models=[{root}/truncated]", "output={root}/o"], "truncated"),
    (
        M,
        ["base={root}/base", "task_vectors=[{root}/tv.safetensors]", "output={root}/o"],
        "tv.safetensors",
    ),  # fmt: skip
    ("finetune", ["init={root}/nan"], "nan or infinite"),
    (
        "finetune",
        ["init=base", "task=custom", "task.train={root}/blank.csv", "task.test={root}/blank.csv"],
        "no examples left",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("stage", "args", "needle"), CASES, ids=[f"{c[0]}:{i}" for i, c in
                                                                 enumerate(CASES)])  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(folders, tmp_path, stage, args, needle):
    run = tmp_path / "runs"
    argv = [a.format(root=folders) for a in args]
    out = cmmerge(stage, *argv, f"run.root={run}", "run.name=r", cwd=tmp_path)
    assert out.returncode == 2, (out.stdout[-1000:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not list(run.rglob("manifest.json")) if run.exists() else True
    assert not list(tmp_path.rglob(".partial-*")) and not (folders / "o").exists()
    assert json.loads((folders / "base" / "config.json").read_text())["model_type"]
