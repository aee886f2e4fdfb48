"""``cpt.head_warmup_steps``: an encoder saved without its MLM head (multilingual-e5's layout)
has the new head trained alone first, the encoder and embeddings frozen; refused in one line
where it does not apply; and at 0 it leaves every finished CPT's fingerprint as it was."""

from __future__ import annotations

import math
import re

import pytest
import torch
import zoo
from conftest import compose
from safetensors.torch import load_file

import cmmerge.training.cpt as training_cpt
from cmmerge.commands import cpt
from cmmerge.config.specs import CptSpec
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import fingerprint

TINY = ["train=smoke", "cpt.max_steps=3", "cpt.batch_size=8", "cpt.max_length=32"]


def test_the_new_head_is_trained_alone_before_the_cpt(tmp_path, monkeypatch):
    e5 = zoo.make("multilingual-e5-small-nopooler", tmp_path / "zoo")
    stored = load_file(e5 / "model.safetensors")
    after_warmup: dict[str, torch.Tensor] = {}
    warm = training_cpt._warm_up_head

    def spy(trainer, *args):
        out = warm(trainer, *args)
        after_warmup.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return out

    monkeypatch.setattr(training_cpt, "_warm_up_head", spy)
    overrides = [f"run.root={tmp_path}", f"model.name_or_path={e5}", "model.kind=encoder"]
    warmup = ["cpt.head_warmup_steps=4", "cpt.head_warmup_lr=0.01", "data.token_lengths=false"]
    cfg = compose("cpt", [*overrides, *TINY, *warmup])
    metrics = cpt.run(cfg)["metrics"]
    assert metrics["head_warmup_steps"] == 4 and math.isfinite(metrics["head_warmup_loss"])
    assert metrics["steps"] == 3  # the CPT's own steps, after the warm-up
    # the encoder and the (tied) embeddings are the stored ones after the warm-up
    for name, value in stored.items():
        assert torch.equal(after_warmup[f"bert.{name}"], value), name
    # the head moved from its initialisation (LayerNorm starts at ones)
    norm = after_warmup["cls.predictions.transform.LayerNorm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))
    plain = compose("cpt", [*overrides, *TINY])  # another checkpoint: another folder
    assert CptSpec.from_config(cfg).folder != CptSpec.from_config(plain).folder


@pytest.mark.parametrize(
    "kind, peft, steps, says",
    [
        ("decoder", None, 5, "masked-LM CPT of an encoder"),
        ("encoder", {"name": "lora"}, 5, "peft=none"),
        ("encoder", None, -1, "give 0 (none)"),
    ],
)
def test_head_warmup_is_refused_where_it_does_not_apply(kind, peft, steps, says):
    with pytest.raises(CmmergeError, match=re.escape(says)):
        training_cpt.check_head_warmup({"head_warmup_steps": steps}, kind, peft)
    assert training_cpt.check_head_warmup({"head_warmup_steps": 0}, kind, peft) == 0


def test_no_warmup_leaves_finished_fingerprints_as_they_were():
    view = CptSpec.from_config(compose("cpt", [])).config_view()
    assert view["cpt"]["head_warmup_steps"] == 0
    assert view["cpt"]["head_warmup_lr"] is None
    new = ("head_warmup_steps", "head_warmup_lr")
    before = {**view, "cpt": {k: v for k, v in view["cpt"].items() if k not in new}}
    assert fingerprint(view, []) == fingerprint(before, [])
    warmed = {**view, "cpt": {**view["cpt"], "head_warmup_steps": 5}}
    assert fingerprint(warmed, []) != fingerprint(before, [])
