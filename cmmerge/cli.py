"""`cmmerge <stage> [hydra overrides]`: dispatch to the stage's Hydra main; nothing else."""

from __future__ import annotations

import contextlib
import difflib
import gc
import itertools
import logging
import os
import sys
import warnings

from cmmerge.stages.registry import STAGES

USAGE = (
    """usage: cmmerge <stage> [key=value ...] [--help] [--cfg job]

Adapt multilingual models to code-mixed tasks: continued pre-training, task vectors, merging,
fine-tuning and evaluation. Every stage reads and writes ${run.root}/${run.name}.

stages:
"""
    + "\n".join(f"  {name:<9} {stage.help}" for name, stage in STAGES.items())
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

_CALLS = itertools.count(1)  # commands run by this process (tests call main more than once)


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


def _task(stage: str, started: list[bool], cpt_choice: tuple = (None, None)):
    def task_function(cfg) -> None:
        from cmmerge.config.cpt_variants import resolve
        from cmmerge.config.sections import check_sections

        started.append(True)
        _quiet_libraries()
        # a log handler that cannot write (a full disk) stays silent instead of printing a
        # "--- Logging error ---" traceback per message: the stage's own error says what failed
        logging.raiseExceptions = False
        logging.getLogger("cmmerge").setLevel(logging.INFO)
        command = STAGES[stage].run
        from cmmerge import dist
        from cmmerge.commands.summary import closing_line

        gc.freeze()  # the modules imported so far stay: no collection walks them again
        gc.enable()
        dist.init()
        try:
            check_sections(cfg)
            strict = stage not in ("report", "status")
            note = resolve(stage, cfg, *cpt_choice, strict=strict)
            result = command(cfg)
        except Exception as err:  # noqa: BLE001 - the one error boundary: a user's error or a bug
            if cfg.get("debug"):
                raise
            from cmmerge.config.values import config_folders
            from cmmerge.stages.runner import as_user_error

            where = cfg.get("output") or f"{cfg.run.root}/{cfg.run.name}"
            user = as_user_error(err, where, config_folders(cfg))
            if user is None:
                raise  # a bug of ours: the traceback stays
            _fail(stage, user)
        line = closing_line(stage, cfg, result) if dist.is_main() else None
        if line:
            print(f"{line} [{note}]" if note else line, flush=True)

    task_function.__name__ = stage
    return task_function


def _fail(stage: str, err: BaseException) -> None:
    """The one line of a user error on stderr, exit status 2."""
    print(f"cmmerge {stage}: error: {err}", file=sys.stderr)
    sys.exit(2)


def _standalone_merge(stage: str, overrides: list[str]) -> list[str]:
    """Hydra settings for a standalone merge (``output=DIR``, no ``run.name``): no log folder
    under runs/ (the merge's own log and manifest go to DIR)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if stage != "merge" or "output" not in keys or "run.name" in keys:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cmmerge` command; ``argv`` (without the program name) is
    ``sys.argv[1:]`` by default. It can be called again in the same process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] in ("-V", "--version"):
        from cmmerge import __version__

        print(f"cmmerge {__version__}")
        return
    stage = args[0]
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, list(STAGES), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}? (" if close else "; "
        choices = f"choose one of: {', '.join(STAGES)}" + (")" if close else "")
        print(f"cmmerge: unknown stage '{stage}'{hint}{choices}", file=sys.stderr)
        sys.exit(2)
    called_from_python = argv is not None
    argv_before, gc_before = sys.argv, gc.isenabled()
    try:
        _run(stage, args[1:])
    finally:  # as they were: main may be called again in this process (the tests do)
        sys.argv = argv_before
        if gc_before:
            gc.enable()
        if called_from_python:  # the command's process ends here: nothing to unfreeze
            gc.unfreeze()


def _run(stage: str, args: list[str]) -> None:
    """Run ``stage`` with the command line's ``args`` through Hydra."""
    debug = "debug=true" in args
    gc.disable()  # importing torch and transformers makes collections that find no garbage
    import hydra

    from cmmerge.config.cpt_variants import given_cpt_keys, take_id
    from cmmerge.config.overrides import check_overrides, override_args
    from cmmerge.config.single_run import is_plain_run, one_composition
    from cmmerge.config.store import register
    from cmmerge.errors import CmmergeError

    register()  # the declared keys that the YAML files list (Hydra reads configs/ as files)
    args, cpt_id = take_id(args)
    overrides = override_args(args)
    plain = is_plain_run(stage, args, overrides)
    try:
        check_keys = check_overrides(
            stage,
            overrides,
            multirun=stage == "sweep" or bool({"-m", "--multirun"} & set(args)),
            defer_keys=plain,
        )
        cpt_choice = (cpt_id, given_cpt_keys(overrides))
    except CmmergeError as err:
        if debug:
            raise
        _fail(stage, err)
    sys.argv = [f"cmmerge {stage}", *args, *_standalone_merge(stage, overrides)]
    from omegaconf import OmegaConf

    # the log folder of each command: a timestamp and the process id, so two commands started
    # in the same second never share one (cached: jobs a launcher runs in other processes
    # resolve this command's id, so a multirun keeps one folder)
    call = next(_CALLS)  # a second command in one process gets its own folder too
    tag = str(os.getpid()) if call == 1 else f"{os.getpid()}-{call}"
    OmegaConf.register_new_resolver("cmmerge_pid", lambda: tag, replace=True, use_cache=True)
    if stage == "sweep":
        from cmmerge.commands.sweep import FAILED

        FAILED.clear()  # an earlier sweep of this process (tests) is not this one's
    started: list[bool] = []
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors: reported below, one line
    try:
        with one_composition(check_keys) if plain else contextlib.nullcontext():
            hydra.main(config_path="configs", config_name=stage, version_base="1.3")(
                _task(stage, started, cpt_choice)
            )()
    except Exception as err:  # noqa: BLE001 - a config error Hydra found before the stage ran
        if started or debug:
            raise
        _fail(stage, " ".join(str(err).split()) or type(err).__name__)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    if stage == "sweep":
        from cmmerge.commands.sweep import FAILED

        if FAILED:  # each was reported as it failed; the other jobs went on
            print(
                f"cmmerge sweep: {len(FAILED)} job(s) failed ({', '.join(FAILED)}): listed in "
                "sweep/summary.md; run the same sweep again to retry them",
                file=sys.stderr,
            )
            sys.exit(2)


def command() -> None:
    """The `cmmerge` program: :func:`main`, then the process ends without tearing the
    interpreter down (exit handlers run and output is flushed first). Unloading torch and
    transformers module by module costs about 0.25 s per command and saves nothing: every file
    cmmerge writes is closed (and synced) before its stage returns."""
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    # What the interpreter does at exit, in its order: wait for non-daemon threads and run the
    # threading exit callbacks (joblib's loky executor stops its worker processes there), then
    # the atexit handlers (multiprocessing joins those workers, logging flushes its files).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    command()
