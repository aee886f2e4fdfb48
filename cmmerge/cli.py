"""`cmmerge <stage> [hydra overrides]`: dispatch to the stage's Hydra main; nothing else."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import warnings

STAGES = {
    "data": "load corpus and task splits, write counts, labels and leakage removed",
    "cpt": "continued pre-training (MLM for encoders, causal LM for decoders)",
    "extract": "task vector tau = theta_cpt - theta_base over backbone parameters",
    "merge": "merge task vectors into the base (task_arithmetic/tv, ties)",
    "finetune": "sequence classification from init=base|cpt|merged|DIR",
    "evaluate": "macro-F1, accuracy, per-class report, confusion matrix, predictions",
    "sweep": "Hydra multirun over lambda/method/density/seed: merge -> finetune -> evaluate",
    "pipeline": "the paper's arms end to end (experiment=demo for the offline demo)",
    "prompt": "zero/few-shot prompting baseline of a decoder (verbaliser log-likelihood)",
    "report": "table of arms x metrics from a run directory (Markdown and CSV)",
}

USAGE = (
    """usage: cmmerge <stage> [key=value ...] [--help] [--cfg job]

Adapt multilingual models to code-mixed tasks: continued pre-training, task vectors, merging,
fine-tuning and evaluation. Every stage reads and writes ${run.root}/${run.name}.

stages:
"""
    + "\n".join(f"  {name:<9} {text}" for name, text in STAGES.items())
    + """

examples:
  cmmerge pipeline experiment=demo
  cmmerge cpt model=tiny-xlmr corpus=en-hi run.name=hi
  cmmerge merge method=ties lambda=0.5 density=0.2 run.name=hi
  cmmerge merge base=DIR models=[DIR1,DIR2] weights=[1,1] method=ties lambda=0.5 output=OUT
  cmmerge sweep lambda=0.1,0.5,1.0 method=task_arithmetic,ties run.name=hi

`cmmerge <stage> --help` lists the config groups and options of a stage;
add debug=true to see full tracebacks.
"""
)


def _quiet_libraries() -> None:
    """Library verbosity through environment variables, so stages that never import
    transformers or datasets (merge, report) do not pay for importing them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _task(stage: str):
    def task_function(cfg) -> None:
        from cmmerge.errors import CmmergeError

        _quiet_libraries()
        logging.getLogger("cmmerge").setLevel(logging.INFO)
        module = importlib.import_module(f"cmmerge.stages.{stage}")
        from cmmerge.stages import dist

        gc.freeze()  # the modules imported so far stay: no collection walks them again
        gc.enable()
        dist.init()
        try:
            module.run(cfg)
        except CmmergeError as err:
            if cfg.get("debug"):
                raise
            print(f"cmmerge {stage}: error: {err}", file=sys.stderr)
            sys.exit(2)

    task_function.__name__ = stage
    return task_function


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cmmerge` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        from cmmerge import __version__

        print(f"cmmerge {__version__}")
        return
    stage = argv[0]
    if stage not in STAGES:
        print(
            f"cmmerge: unknown stage '{stage}'; choose one of: {', '.join(STAGES)}", file=sys.stderr
        )
        sys.exit(2)
    if "debug=true" in argv[1:]:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    gc.disable()  # importing torch and transformers makes collections that find no garbage
    import hydra

    sys.argv = [f"cmmerge {stage}", *argv[1:]]
    hydra.main(config_path="configs", config_name=stage, version_base="1.3")(_task(stage))()


if __name__ == "__main__":
    main()
