"""The merge's outline check of a model folder: config.json's width and depth against the
weights, without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import save_file

from cmmerge.models.check import model_folder_problem, outline_mismatch

ENTRIES = {
    "roberta.embeddings.word_embeddings.weight": (100, 32),
    "roberta.encoder.layer.0.attention.self.query.weight": (32, 32),
    "roberta.encoder.layer.1.attention.self.query.weight": (32, 32),
}


def test_outline_agrees_and_names_the_width_or_depth_that_does_not():
    assert outline_mismatch({"hidden_size": 32, "num_hidden_layers": 2}, ENTRIES) is None
    wide = outline_mismatch({"hidden_size": 48, "num_hidden_layers": 2}, ENTRIES)
    assert "[100, 32] in the weights, hidden size 48 by config.json" in wide
    deep = outline_mismatch({"hidden_size": 32, "num_hidden_layers": 3}, ENTRIES)
    assert "hold 2 layers, config.json says 3" in deep
    # a multimodal config's text part; a decoder's names
    decoder = {"model.embed_tokens.weight": (50, 16), "model.layers.0.mlp.up_proj.weight": (8, 16)}
    assert outline_mismatch({"text_config": {"hidden_size": 16}}, decoder) is None
    assert "hidden size 24" in outline_mismatch({"text_config": {"hidden_size": 24}}, decoder)
    assert outline_mismatch({}, ENTRIES) is None  # nothing to compare


def test_the_outline_check_of_a_folder_imports_no_transformers(tmp_path):
    import torch

    save_file({k: torch.zeros(s) for k, s in ENTRIES.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48, "model_type": "xyz"}))
    code = (
        "import sys; from cmmerge.models.check import model_folder_problem as p; "
        f"print(p({str(tmp_path)!r}, deep=False)); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    problem, imported = out.stdout.strip().splitlines()
    assert "hidden size 48 by config.json" in problem and imported == "False"
    # the deep check also knows the model type is not one transformers has
    assert "model type 'xyz'" in model_folder_problem(tmp_path)
