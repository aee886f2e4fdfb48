"""`cmmerge merge` as users run it: outputs of a standalone merge, and bad input ending with one
line on stderr, exit status 2 and nothing that looks finished."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
import torch
import yaml
from conftest import cmmerge, cmmerge_process, xlmr_pair
from hydra import compose, initialize_config_module
from safetensors.torch import save_file

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return xlmr_pair(tmp_path_factory.mktemp("cli"))


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return cmmerge("merge", *args, f"run.root={cwd}/runs", cwd=cwd)


def _assert_refused(proc: subprocess.CompletedProcess, out, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in lines[0], lines[0]
    assert not (out / "manifest.json").exists() and not out.exists()


def test_standalone_merge_writes_a_loadable_described_model(dirs, tmp_path):
    out = tmp_path / "merged"
    proc = _cli(
        f"base={dirs / 'base'}",
        f"models=[{dirs / 'tuned'}]",
        "weights=[0.7]",
        "method=ties",
        "lambda=0.8",
        "density=0.3",
        f"output={out}",
        "max_shard_size=30KB",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "README.md",
        "merge.yaml",
        "mergekit.yaml",
        "manifest.json",
        "model.safetensors.index.json",
    } <= names
    assert ".cmmerge-partial" not in names
    record = yaml.safe_load((out / "merge.yaml").read_text())
    assert record["method"] == "ties" and record["lambda"] == 0.8 and record["density"] == 0.3
    assert record["weights"] == [0.7]
    weight_file = dirs / "tuned" / "model.safetensors"
    assert record["sources"][0]["sha256"] == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    base_file = dirs / "base" / "model.safetensors"
    assert record["base_sha256"] == hashlib.sha256(base_file.read_bytes()).hexdigest()
    assert record["sources"][0]["sha256"] in (out / "README.md").read_text()
    mk = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert mk["merge_method"] == "ties" and mk["parameters"]["lambda"] == 0.8
    assert mk["models"][0]["parameters"] == {"weight": 0.7, "density": 0.3}
    card = (out / "README.md").read_text()
    assert "| lambda | 0.8 |" in card and "tuned" in card
    model = transformers.AutoModelForMaskedLM.from_pretrained(out)
    with CheckpointReader(out) as r:
        emb = r.get("roberta.embeddings.word_embeddings.weight")
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_the_program_ends_at_once_with_everything_written_and_its_status(dirs, tmp_path):
    """The `cmmerge` program skips the interpreter's teardown (cli.command): the merge's files,
    log and closing line are all there, and a refused input still ends with status 2. A merge
    loads neither the data layer (datasets, pandas) nor transformers nor torch (the engine is
    numpy): seconds of start-up."""
    out = tmp_path / "merged"
    args = [f"base={dirs / 'base'}", f"models=[{dirs / 'tuned'}]", "method=ties", "lambda=0.5"]
    run = ("merge", *args, f"output={out}", f"run.root={tmp_path}/runs")
    proc = cmmerge_process(*run, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert {"numpy", "hydra", "cmmerge.merging.engine"} <= imported
    assert not imported & {"torch", "datasets", "pandas", "transformers", "cmmerge.data.tasks"}
    assert "cmmerge merge: ties lambda=0.5" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert "merge: running" in (out / "merge.log").read_text()
    with CheckpointReader(out) as merged, CheckpointReader(dirs / "base") as base:
        assert merged.keys() == base.keys()
    bad = cmmerge_process("merge", *args, "density=2", f"output={tmp_path / 'o'}")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "density" in bad.stderr and not (tmp_path / "o").exists()


def test_cli_bad_density_and_truncated_checkpoint(dirs, tmp_path):
    out = tmp_path / "o"
    proc = _cli(
        f"base={dirs / 'base'}",
        f"models=[{dirs / 'tuned'}]",
        "method=ties",
        "density=1.5",
        f"output={out}",
        cwd=tmp_path,
    )
    _assert_refused(proc, out, "density must be in (0, 1], got 1.5")
    trunc = tmp_path / "trunc"
    shutil.copytree(dirs / "tuned", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-1000])
    proc = _cli(
        f"base={dirs / 'base'}", f"models=[{trunc}]", "method=tv", f"output={out}", cwd=tmp_path
    )
    _assert_refused(proc, out, "truncated")


def _run_stage(tmp_path, *overrides: str) -> None:
    from cmmerge.commands import merge

    with initialize_config_module("cmmerge.configs", version_base="1.3"):
        cfg = compose("merge", overrides=[f"run.root={tmp_path}/runs", *overrides])
    merge.run(cfg)


def test_stage_refuses_bad_input_and_leaves_nothing(dirs, tmp_path):
    out = tmp_path / "o"
    common = (f"base={dirs / 'base'}", f"output={out}")
    with pytest.raises(CmmergeError, match=r"models=\[\] is empty"):
        _run_stage(tmp_path, *common, "models=[]")
    nan = tmp_path / "nan"
    nan.mkdir()
    shutil.copy(dirs / "tuned" / "config.json", nan)
    with CheckpointReader(dirs / "tuned") as r:
        tensors = {k: r.get(k) for k in r.keys()}
    tensors["roberta.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(tensors, str(nan / "model.safetensors"))
    with pytest.raises(CmmergeError, match="non-finite .*layer.0.output.dense.weight"):
        _run_stage(tmp_path, *common, f"models=[{nan}]", "method=tv")
    assert not out.exists()
    with pytest.raises(CmmergeError, match="weights has 2 values for 1 sources"):
        _run_stage(tmp_path, *common, f"models=[{dirs / 'tuned'}]", "weights=[1,2]")
    _run_stage(tmp_path, *common, f"models=[{nan}]", "method=tv", "allow_nonfinite=true")
    assert (out / "manifest.json").exists()
    assert yaml.safe_load((out / "merge.yaml").read_text())["method"] == "task_arithmetic"


def _digests(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_output_that_is_or_holds_an_input_is_refused_before_writing(dirs, tmp_path):
    first = tmp_path / "first"
    common = (f"models=[{dirs / 'tuned'}]", "method=tv")
    _run_stage(tmp_path, f"base={dirs / 'base'}", *common, f"output={first}")
    before = _digests(first)
    cases = [
        (f"base={first}", f"models=[{dirs / 'tuned'}]", f"output={first}"),  # deleted it before
        (f"base={dirs / 'base'}", f"models=[{first}]", f"output={first}"),
        (f"base={first}", f"models=[{dirs / 'tuned'}]", f"output={first / 'sub'}"),
        (f"base={first}", f"models=[{dirs / 'tuned'}]", f"output={tmp_path}"),
    ]
    for args in cases:
        with pytest.raises(
            CmmergeError,
            match=r"output folder .* (is|is inside|contains) (the base|a source) .*would destroy",
        ):
            _run_stage(tmp_path, *args, "method=tv")
        assert _digests(first) == before, args
        assert not (first / "sub").exists()
    proc = _cli(f"base={first}", f"models=[{dirs / 'tuned'}]", f"output={first}", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "writing it would destroy" in proc.stderr and _digests(first) == before


def test_bf16_base_gives_a_float32_model_recorded_as_such(dirs, tmp_path):
    b16 = tmp_path / "b16"
    model = transformers.AutoModelForMaskedLM.from_pretrained(dirs / "base")
    model.to(torch.bfloat16).save_pretrained(b16)
    assert json.loads((b16 / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "o"
    _run_stage(tmp_path, f"base={b16}", f"models=[{dirs / 'tuned'}]", "method=tv", f"output={out}")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert yaml.safe_load((out / "merge.yaml").read_text())["dtype"] == "float32"
    assert "| dtype | float32 |" in (out / "README.md").read_text()
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    with CheckpointReader(out) as r, CheckpointReader(dirs / "tuned") as t:
        for key in r.keys():  # lambda 1: the tuned model, heads included, in float32
            assert r.dtype(key) == torch.float32
            torch.testing.assert_close(r.get(key), t.get(key), rtol=0, atol=1e-6)
    out16 = tmp_path / "o16"
    _run_stage(
        tmp_path, f"base={b16}", f"models=[{dirs / 'tuned'}]", "method=tv", "dtype=bfloat16",
        f"output={out16}",
    )  # fmt: skip
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForMaskedLM.from_pretrained(out16).dtype == torch.bfloat16
