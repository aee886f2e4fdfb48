"""`cmmerge cpt`: continued pre-training on the leakage-free corpus -> cpt/model/."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cmmerge import dist
from cmmerge.config.specs import CptSpec
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.training.cpt import train_lm

log = logging.getLogger("cmmerge")


def _check_corpus(name: str, texts: list[str], stats: dict) -> None:
    """Log what the corpus kept and dropped; a corpus with no text left is an error."""
    removed = (
        f"{stats['raw']} read: {stats['empty_removed']} blank, {stats['duplicates_removed']} "
        f"duplicate(s), {stats['leakage_removed']} evaluation text(s) removed"
    )
    if not texts:
        raise CmmergeError(f"corpus {name}: no text left for CPT ({removed})")
    log.info("corpus %s: %d texts kept (%s)", name, len(texts), removed)


@dataclass(frozen=True)
class CptJob:
    """A continued pre-training with everything resolved from the command: all that
    :func:`work` reads.

    Attributes:
        spec: The CPT's spec (model, corpus, training settings, LoRA, seed).
        base: The base model folder.
        kind: ``encoder`` (masked LM) or ``decoder`` (causal LM).
        model_name: The model preset's name, for the model card.
        texts: The corpus after the leakage guard.
        corpus_stats: What the corpus kept and dropped.
        cache: cmmerge's cache folder (tokenised corpora).
    """

    spec: CptSpec
    base: Path
    kind: str
    model_name: str
    texts: list[str] = field(hash=False, compare=False)
    corpus_stats: dict = field(hash=False, compare=False)
    cache: Path


def work(job: CptJob, stage_dir: Path) -> dict:
    """Train on the corpus into ``stage_dir`` (resuming from its checkpoints), keep the model
    and its metrics; returns what the manifest records."""
    spec, base, kind, stats = job.spec, job.base, job.kind, job.corpus_stats
    corpus = str(spec.corpus["name"])
    texts = job.texts
    _check_corpus(corpus, texts, stats)
    config_view = spec.config_view()
    metrics = train_lm(
        base,
        kind,
        texts,
        config_view["cpt"],
        stage_dir,
        spec.seed,
        config_view["peft"],
        cache_dir=job.cache,
    )
    if not dist.is_main():
        return {"metrics": metrics}
    write_json_atomic(stage_dir / "metrics.json", metrics)
    objective = "masked LM" if kind == "encoder" else "causal LM"
    how = "LoRA, merged into the weights" if metrics["lora"] else "full parameters"
    write_model_card(
        stage_dir / "model",
        f"{job.model_name} + CPT on {corpus}",
        f"Continued pre-training ({objective}, {how}) of `{base}` on "
        f"the {corpus} code-mixed corpus by cmmerge.",
        {
            "base": base,
            "corpus": corpus,
            "texts": stats["kept"],
            "leakage removed": stats["leakage_removed"],
            "steps": metrics["steps"],
            "lr": spec.cpt["lr"],
            "fast loss": metrics["fast_loss"],
            "packing": metrics["packing"],
            "held-out perplexity": f"{metrics['perplexity_before']:.2f} -> "
            f"{metrics['perplexity']:.2f}",
        },
    )
    return {
        "metrics": metrics,
        "outputs": ["model/", "metrics.json"],
        "corpus": stats,
        "base_model": str(base),
        "kind": kind,
    }
