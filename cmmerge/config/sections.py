"""The training sections' keys (``cpt.*``, ``finetune.*``, ``evaluate.*``), each declared once:
default (for real models), type, allowed values and what it does.

:func:`register` stores their defaults in Hydra's ConfigStore as the ``train`` group's option
``default`` (which ``configs/common.yaml`` selects); ``configs/train/smoke.yaml`` extends it
with the values that differ for the tiny models, and models and experiments override single
keys as before. The override check refuses a wrong value on the command line with these
declarations, and :func:`check_sections` refuses one that a config file set, before any stage
runs. Values are checked, never converted: folder names and fingerprints hash them as given.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmmerge.config.keys import Key
from cmmerge.errors import CmmergeError

GROUP, OPTION = "train", "default"  # where the defaults are stored in the ConfigStore

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_PRECISION_DOC = (
    "auto (bf16 on GPUs that have it, fp16 on others, fp32 on CPU) | fp32 | bf16 | fp16"
)
_REPORT_DOC = "none | tensorboard | wandb, or a list of them"


def _training(section: str, *after_max_steps: Key, **defaults: Any) -> list[Key]:
    """The keys that CPT and fine-tuning share, with the section's defaults; ``after_max_steps``
    come in between, where the section lists them (key order is kept in composed configs)."""
    d = defaults
    return [
        Key(f"{section}.epochs", d["epochs"], "passes over the data", float, low=0),
        Key(f"{section}.max_steps", -1, "> 0 overrides epochs", int),
        *after_max_steps,
        Key(f"{section}.batch_size", d["batch_size"], "examples per device and step", int, low=1),
        Key(f"{section}.grad_accum", 1, "steps accumulated per update", int, low=1),
        Key(f"{section}.max_length", 128, "tokens per example (longer ones are cut)", int, low=1),
        Key(f"{section}.lr", d["lr"], "peak learning rate", float, low=0),
        Key(f"{section}.warmup", 0.06, "< 1: fraction of steps, else steps", float, low=0),
        Key(f"{section}.weight_decay", 0.01, "AdamW weight decay", float, low=0),
    ]


SECTION_KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("cpt.seed", 0, "seed of CPT (masking, order, initialisation)", int, low=0),
        *_training("cpt", epochs=1, batch_size=16, lr=5.0e-5),
        Key("cpt.mlm_probability", 0.15, "share of tokens masked (encoders)", float, low=0),
        Key("cpt.eval_fraction", 0.05, "corpus held out for perplexity before/after", float, low=0),
        Key("cpt.logging_steps", 50, "log every N steps", int, low=1),
        Key("cpt.report_to", "none", _REPORT_DOC + " (as finetune.report_to)"),
        Key(
            "cpt.fast_loss", True, "MLM head on masked positions only, chunked causal-LM loss", bool
        ),
        Key(
            "cpt.packing",
            None,
            "pack documents into max_length blocks; null: true for decoders",
            bool,
        ),
        Key("cpt.loss_chunk_size", 1024, "causal LM: rows of logits computed at once", int, low=1),
        Key(
            "cpt.save_steps",
            500,
            "checkpoint every N steps; an interrupted CPT resumes from it",
            int,
            low=1,
        ),
        Key("cpt.gradient_checkpointing", False, "trade compute for activation memory", bool),
        Key("cpt.whole_word_mask", False, "mask whole words (encoders)", bool),
        Key(
            "cpt.head_warmup_steps",
            0,
            "encoders saved without an MLM head (e5): train the new head alone for N steps first",
            int,
            low=0,
        ),
        Key("cpt.head_warmup_lr", None, "its learning rate (null: lr)", float, low=0),
        Key("cpt.precision", "auto", _PRECISION_DOC, str, _PRECISIONS),
        Key("finetune.precision", "auto", "as cpt.precision", str, _PRECISIONS),
        *_training(
            "finetune",
            Key(
                "finetune.train_size",
                None,
                "N: train on a seeded, stratified N-example subset (data.split_seed)",
                int,
                low=1,
            ),
            epochs=3,
            batch_size=32,
            lr=2.0e-5,
        ),
        Key(
            "finetune.early_stopping_patience",
            2,
            "evaluations without gain before stopping",
            int,
            low=0,
        ),
        Key(
            "finetune.class_weights",
            None,
            "balanced: weight classes by inverse frequency",
            str,
            ("balanced", "none"),
        ),
        Key("finetune.sequential", [], "tasks fine-tuned on first, in order (sequential FT arm)"),
        Key("finetune.joint", [], "tasks whose train sets are added (joint FT arm)"),
        Key("finetune.report_to", "none", _REPORT_DOC),
        Key("finetune.logging_steps", 50, "log every N steps", int, low=1),
        Key("evaluate.batch_size", 64, "examples per forward pass", int, low=1),
        Key("evaluate.max_length", 128, "tokens per example (longer ones are cut)", int, low=1),
    )
}


def defaults() -> dict[str, Any]:
    """The sections' defaults as a nested mapping, in declared order (``cpt``, ``finetune``,
    ``evaluate``)."""
    node: dict[str, dict[str, Any]] = {}
    for key in SECTION_KEYS.values():
        section, leaf = key.name.split(".")
        node.setdefault(section, {})[leaf] = (
            list(key.default) if isinstance(key.default, list) else key.default
        )
    return node


def check_sections(cfg: DictConfig) -> None:
    """Refuse, in one line, a declared section key that a config file set to a value it does
    not take (the command line's values were checked before composing)."""
    for name, key in SECTION_KEYS.items():
        value = OmegaConf.select(cfg, name, default=None, throw_on_resolution_failure=False)
        problem = key.problem(value)
        if problem:
            raise CmmergeError(
                f"{name}={value}: {problem} (set in a config file, e.g. the experiment, or "
                "by a ++ override)"
            )


def register() -> None:
    """Store the defaults as the ``train`` group's option ``default`` (package ``_global_``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=GROUP, name=OPTION, node=defaults(), package="_global_")
