"""`cmmerge cpt`: continued pre-training on the leakage-free corpus -> cpt/model/."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from cmmerge import dist
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.models.loading import model_kind
from cmmerge.settings import cache_dir, data_root
from cmmerge.stages.inputs import corpus_input, cpt_corpus, data_inputs, resolve_model
from cmmerge.stages.runner import RunContext, folder_input, run_stage
from cmmerge.stages.spec import CptSpec
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


def run(cfg: DictConfig) -> dict:
    spec = CptSpec.from_config(cfg)
    base = resolve_model(cfg)
    kind = model_kind(base, str(cfg.model.kind))
    data_root(cfg)  # a missing data.root is named before anything is locked
    config_view = spec.config_view()
    texts, corpus_stats = cpt_corpus(cfg)

    def work(stage_dir):
        _check_corpus(str(cfg.corpus.name), texts, corpus_stats)
        peft_cfg = config_view["peft"]
        metrics = train_lm(
            base,
            kind,
            texts,
            config_view["cpt"],
            stage_dir,
            spec.seed,
            peft_cfg,
            cache_dir=cache_dir(cfg),
        )
        if not dist.is_main():
            return {"metrics": metrics}
        write_json_atomic(stage_dir / "metrics.json", metrics)
        objective = "masked LM" if kind == "encoder" else "causal LM"
        how = "LoRA, merged into the weights" if metrics["lora"] else "full parameters"
        write_model_card(
            stage_dir / "model",
            f"{cfg.model.name} + CPT on {cfg.corpus.name}",
            f"Continued pre-training ({objective}, {how}) of `{base}` on "
            f"the {cfg.corpus.name} code-mixed corpus by cmmerge.",
            {
                "base": base,
                "corpus": cfg.corpus.name,
                "texts": corpus_stats["kept"],
                "leakage removed": corpus_stats["leakage_removed"],
                "steps": metrics["steps"],
                "lr": cfg.cpt.lr,
                "fast loss": metrics["fast_loss"],
                "packing": metrics["packing"],
                "held-out perplexity": f"{metrics['perplexity_before']:.2f} -> "
                f"{metrics['perplexity']:.2f}",
            },
        )
        return {
            "metrics": metrics,
            "outputs": ["model/", "metrics.json"],
            "corpus": corpus_stats,
            "base_model": str(base),
            "kind": kind,
        }

    inputs = [folder_input(base), *data_inputs(cfg, [], corpus=True), corpus_input(cfg, texts)]
    return run_stage(
        RunContext.of(cfg),
        "cpt",
        spec.folder,
        config_view,
        inputs,
        work,
        all_ranks=True,
        resumable=True,
    )
