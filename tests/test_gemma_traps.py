"""The traps a real pretrained decoder (Gemma-3-270M) showed in every stage (DESIGN 5): LoRA task
vectors full of zeros, extract's recorded path, CPT's own peft, the majority-class advice for a
pretrained model, and prompting's verbaliser tokens and majority-class baseline."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import FAST, compose, tiny_llama
from safetensors.torch import save_file

from cmmerge.config.specs import CptSpec, FinetuneSpec, PromptSpec
from cmmerge.evaluation.baseline import majority_baseline_warning
from cmmerge.evaluation.metrics import classification_metrics
from cmmerge.evaluation.prompting import check_verbalizers, encode_rows
from cmmerge.io.checkpoint import CheckpointReader
from cmmerge.merging.engine import merge_into_base
from cmmerge.merging.extract import extract_task_vector, task_vector_cosines
from cmmerge.stages.prompt import majority_baseline

LABELS = ["negative", "neutral", "positive"]
ADAPTED = ("q_proj", "v_proj")  # what a LoRA on attention changes; the rest stays the base's


def _tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


@pytest.fixture(scope="module")
def lora_like(tmp_path_factory):
    """A tiny Llama base, a copy changed only in q/v projections (as a merged LoRA CPT), and a
    copy changed everywhere (a full fine-tune)."""
    root = tmp_path_factory.mktemp("lora-like")
    torch.manual_seed(0)
    model = tiny_llama(100)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(a in name for a in ADAPTED):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "lora")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "full")
    return root


def _with_zeros_stored(sparse, base_dir, out):
    """The task vector as extract wrote it before: every tensor stored, zeros included."""
    with CheckpointReader(sparse) as r:
        tensors = {k: r.get(k) for k in r.keys()}
        zero = json.loads(r.metadata["zero_tensors"])
        meta = {k: v for k, v in r.metadata.items() if k != "zero_tensors"}
    with CheckpointReader(base_dir) as b:
        shapes = {k.removeprefix("model."): b.shape(k) for k in b.keys()}
    tensors |= {name: torch.zeros(shapes[name]) for name in zero}
    save_file(tensors, str(out), metadata=meta)
    return out


def test_a_lora_task_vector_leaves_its_zero_tensors_out_and_merges_the_same(lora_like, tmp_path):
    base = lora_like / "base"
    stats = extract_task_vector(base, lora_like / "lora", tmp_path / "tau.safetensors")
    stored = _tensors(tmp_path / "tau.safetensors")
    assert stored and all(any(a in k for a in ADAPTED) for k in stored)
    assert "embed_tokens.weight" in stats["zero_tensors"] and "norm.weight" in stats["zero_tensors"]
    assert stats["n_tensors"] == len(stored) == 4  # q and v of 2 layers
    assert len(stats["per_tensor"]) == len(stored) + len(stats["zero_tensors"])
    assert stats["per_tensor"]["embed_tokens.weight"] == {"l2": 0.0, "n_params": 3200,
                                                          "frac_changed": 0.0}  # fmt: skip
    full = extract_task_vector(base, lora_like / "full", tmp_path / "full.safetensors")
    assert full["zero_tensors"] == []
    dense = _with_zeros_stored(tmp_path / "tau.safetensors", base, tmp_path / "dense.safetensors")
    # the same cosines as with the zeros stored (a missing tensor counts as zero)
    cos = task_vector_cosines([tmp_path / "tau.safetensors", tmp_path / "full.safetensors"])
    ref = task_vector_cosines([dense, tmp_path / "full.safetensors"])
    assert cos[0][1] == pytest.approx(ref[0][1], rel=1e-9) and 0.1 < cos[0][1] < 0.99
    # merges read the left-out tensors as zeros: bit-identical to the dense vector's merges
    for method, kw in (("task_arithmetic", {}), ("ties", {"density": 0.3})):
        for extra in ([], [tmp_path / "full.safetensors"]):
            weights = [1.0] * (1 + len(extra))
            a, b = tmp_path / f"a-{method}-{len(extra)}", tmp_path / f"b-{method}-{len(extra)}"
            info = merge_into_base(base, [tmp_path / "tau.safetensors", *extra], weights,
                                   method, 0.7, a, **kw)  # fmt: skip
            merge_into_base(base, [dense, *extra], weights, method, 0.7, b, **kw)
            got, want = _tensors(a), _tensors(b)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got), (method, len(extra))
            if not extra:  # zero in the only source: copied from the base, listed
                assert "model.embed_tokens.weight" in info["zero_in_every_source"]
                assert info["not_in_every_source"] == []
            else:
                assert info["zero_in_every_source"] == []


def test_extract_records_the_final_file_not_the_partial_folder(tmp_path):
    from cmmerge.commands import cpt, extract
    from cmmerge.config.ids import stage_dirs

    common = ["model=tiny-llama", f"run.root={tmp_path}", *FAST, "cpt.max_steps=2",
              "peft=lora"]  # fmt: skip
    cpt.run(compose("cpt", common))
    extract.run(compose("extract", common))
    folder = stage_dirs(compose("extract", common))["extract"]
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["file"] == str(folder / "task_vector.safetensors")
    assert (folder / "task_vector.safetensors").is_file() and ".partial" not in stats["file"]
    # a LoRA CPT leaves the embedding, the norms and the MLP as they were
    assert "embed_tokens.weight" in stats["zero_tensors"]
    with CheckpointReader(folder / "task_vector.safetensors") as r:
        assert "embed_tokens.weight" not in r.keys() and len(r.keys()) == stats["n_tensors"]


def test_cpt_has_its_own_peft_and_old_runs_keep_their_folders():
    """``cpt_peft=none peft=lora``: full CPT, LoRA fine-tuning of the merged model; unset, CPT
    follows ``peft`` as before, with the same folders."""

    def ids(*overrides):
        cfg = compose("finetune", ["model=tiny-llama", "run.root=/runs", *overrides])
        return CptSpec.from_config(cfg), FinetuneSpec.from_config(cfg)

    cpt, ft = ids()
    assert cpt.folder_id == "en-hi" and ft.folder_id.endswith("sentiment-en-hi-s0")
    cpt, ft = ids("peft=lora")
    assert cpt.folder_id == "en-hi-lora" and "-lora" in ft.folder_id
    cpt_l, _ = ids("peft=lora", "cpt_peft=lora")  # the same as leaving it to peft
    assert cpt_l == cpt and cpt_l.fingerprint([]) == cpt.fingerprint([])
    cpt, ft = ids("peft=lora", "cpt_peft=none")
    assert cpt.folder_id == "en-hi" and cpt.config_view()["peft"] == {"name": "none"}
    assert ft.folder_id.startswith("ties-") and "-lora-" in ft.folder_id
    assert ft.peft["name"] == "lora" and ft.start.cpt.folder_id == "en-hi"  # merged from it
    assert ids("peft=lora", "cpt_peft=none")[0] == ids()[0]  # shares the plain full CPT
    cpt, ft = ids("cpt_peft={name: lora, r: 4}")
    assert cpt.folder_id.startswith("en-hi-lora-") and cpt.config_view()["peft"]["r"] == 4
    assert ft.peft == {"name": "none"} and ft.start.cpt == cpt  # full FT of the LoRA-CPT merge


def test_cpt_peft_names_a_peft_preset_or_is_refused(tmp_path, capsys):
    from cmmerge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["cpt", "model=tiny-llama", f"run.root={tmp_path}", "cpt_peft=qlora"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft 'qlora'" in err[0] and "lora, none" in err[0]
    assert not (tmp_path / "default" / "cpt").exists()


def test_a_collapsed_pretrained_model_is_told_to_lower_its_lr(caplog):
    gold = [0] * 88 + [1] * 115 + [2] * 97
    constant = classification_metrics(gold, [2] * len(gold), LABELS)
    with caplog.at_level(logging.WARNING, logger="cmmerge"):
        high = majority_baseline_warning(constant, LABELS, {"epochs": 3, "lr": 1e-3}, True)
        low = majority_baseline_warning(constant, LABELS, {"epochs": 3, "lr": 2e-5}, True)
        tiny = majority_baseline_warning(constant, LABELS, {"epochs": 3, "lr": 1e-3})
    assert "lower finetune.lr" in high and "raise" not in high and "lr=0.001" in high
    assert "train longer" in low and "wrecked" not in low and "wrecked" in high
    assert "raise finetune.epochs or finetune.lr" in tiny  # tiny random models: as before
    assert len(caplog.records) == 3


class _SpaceTokenizer:
    """Words split on spaces, a leading space kept on the word; BOS = 1 in front."""

    all_special_ids = [1]

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, piece):
        return self.vocab.setdefault(piece, 10 + len(self.vocab))

    def __call__(self, text, add_special_tokens=True):
        pieces, word = [], ""
        for ch in text:
            if ch == " " and word:
                pieces.append(word)
                word = ""
            word += ch
        pieces += [word] if word else []
        ids = [self._id(p) for p in pieces]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def convert_ids_to_tokens(self, ids):
        names = {v: k for k, v in self.vocab.items()} | {1: "<bos>"}
        return [names[i] for i in ids]


def test_verbalisers_are_checked_against_the_joined_text(caplog):
    tok = _SpaceTokenizer()
    prompt = "Tweet: good\nSentiment:"
    with caplog.at_level(logging.WARNING, logger="cmmerge"):
        assert check_verbalizers(tok, prompt, [" pos", " neg"], [tok(" pos", False)["input_ids"],
                                 tok(" neg", False)["input_ids"]]) == []  # fmt: skip
        odd = check_verbalizers(tok, prompt, ["pos"], [tok("pos", False)["input_ids"]])
    assert odd == ["pos"] and "Sentiment:pos']" in caplog.text
    rows, _ = encode_rows(tok, [prompt], [" pos", " neg"], 64)
    assert rows[0][0][0] == 1 and rows[0][0].count(1) == 1  # one BOS, in front of the prompt


def test_prompting_reports_the_majority_class_beside_its_score():
    gold = [2] * 200 + [0] * 60 + [1] * 40
    one_class = [2] * 300
    m = classification_metrics(gold, one_class, LABELS)
    b = majority_baseline(gold, one_class, LABELS, m["macro_f1"])
    assert b["majority_label"] == "positive" and b["beats_majority"] is False
    assert b["predicted_counts"] == {"negative": 0, "neutral": 0, "positive": 300}
    assert b["majority_macro_f1"] == pytest.approx(m["macro_f1"])
    better = majority_baseline(gold, gold[:250] + [0] * 50, LABELS, 0.8)
    assert better["beats_majority"] is True


def test_the_prompt_stage_says_whether_it_beats_the_majority_class(tmp_path):
    from cmmerge.commands import prompt
    from cmmerge.commands.summary import closing_line

    cfg = compose("prompt", ["model=tiny-llama", f"run.root={tmp_path}", "run.name=p"])
    manifest = prompt.run(cfg)
    out = tmp_path / "p" / "prompt" / PromptSpec.from_config(cfg).folder_id
    metrics = json.loads((out / "metrics.json").read_text())
    counts = [c["support"] for c in metrics["per_class"].values()]
    assert metrics["majority_macro_f1"] == pytest.approx(2 * max(counts) / (300 + max(counts)) / 3)
    assert sum(metrics["predicted_counts"].values()) == 300
    assert metrics["beats_majority"] == (metrics["macro_f1"] > metrics["majority_macro_f1"])
    top = max(metrics["per_class"], key=lambda k: metrics["per_class"][k]["support"])
    assert manifest["majority_label"] == metrics["majority_label"] == top
    line = closing_line("prompt", cfg, manifest)
    verdict = "beats" if metrics["beats_majority"] else "does NOT beat"
    assert f"{verdict} the majority class ('{top}': " in line


def test_the_gemma_preset_without_a_folder_names_its_builder(tmp_path, capsys):
    from cmmerge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["cpt", "model=gemma3-270m", f"run.root={tmp_path}", "peft=lora"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set model.name_or_path" in err[0]
    assert "scripts/make_gemma3_270m.sh DIR" in err[0]
    assert not list(tmp_path.rglob("manifest.json"))
