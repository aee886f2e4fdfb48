"""Bad inputs, table-driven: each ends with one line on stderr naming what is wrong, exit status
2, no traceback, and nothing left that looks finished (no manifest, no partial folder)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose, xlmr_pair
from safetensors.torch import load_file, save_file
from test_cli import cmmerge

from cmmerge.commands import merge
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import resolve_model
from cmmerge.io import transaction

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
    for name in ("tiny_truncated", "tiny_noweights"):  # init=DIR with damaged weights
        shutil.copytree(root / "tiny", root / name)
    data = (root / "tiny_truncated" / "model.safetensors").read_bytes()
    (root / "tiny_truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "tiny_noweights" / "model.safetensors").unlink()
    # an earlier standalone merge, to be named as base (or source) and output at once
    earlier = [f"base={root / 'base'}", f"models=[{root / 'tuned'}]", f"output={root / 'merged'}"]
    merge.run(compose("merge", [*earlier, f"run.root={root / 'runs'}"]))
    assert transaction.problem(root / "merged") is None
    return root


M = "merge"
# 42 bad inputs across the stages (the issue asks for at least 30), and the damaged upstream
# manifests of test_garbage_upstream_manifest_is_refused_in_one_line below.
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
    ("merge", ["density=2"], "density"),
    ("finetune", ["init=base", "finetune.train_size=0"], "train_size"),
    ("finetune", ["init={root}/tiny_truncated"], "truncated"),
    ("finetune", ["init={root}/tiny_noweights"], "no model.safetensors"),
    (M, ["base={root}/merged", "models=[{root}/tuned]", "output={root}/merged"], "is the base"),
    (M, ["base={root}/base", "models=[{root}/merged]", "output={root}/merged"], "is a source"),
    ("finetune", ["init=base", "finetune.train_size=abc"], "train_size"),
]


def _case_id(i: int, case) -> str:
    return f"{(case.values if hasattr(case, 'values') else case)[0]}:{i}"


@pytest.mark.parametrize(("stage", "args", "needle"), CASES, ids=[_case_id(i, c) for i, c in
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
    assert transaction.problem(folders / "merged") is None  # an earlier merge named is intact


# A damaged manifest of the stage a command reads: treated as absent (or incomplete) and
# refused in one line that says what to run, the damaged stage left as it is.
GARBAGE = ["{not json", '{"stage": "cpt"}', "[]", ""]


@pytest.mark.parametrize("content", GARBAGE)
@pytest.mark.parametrize(
    ("stage", "upstream", "args"),
    [("extract", "cpt", []), ("evaluate", "finetune", ["init=base"])],
)
def test_garbage_upstream_manifest_is_refused_in_one_line(tmp_path, stage, upstream, args, content):
    run = tmp_path / "runs"
    overrides = [*args, f"run.root={run}", "run.name=r"]
    folder = stage_dirs(compose(stage, overrides))[upstream]
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(content)
    (folder / "metrics.json").write_text("{}")
    out = cmmerge(stage, *overrides, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout[-1000:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert upstream in lines[0] and f"cmmerge {upstream}" in lines[0], lines[0]
    assert [p.parent for p in run.rglob("manifest.json")] == [folder]  # nothing else written
    assert not list(run.rglob(".partial-*"))
