"""The README is executable: every `cmmerge` command in its code blocks and tables runs, in
order, on the tiny models in a scratch folder and makes the files it promises; every error shown
in a `console` block is the one printed. Commands that cannot run offline are listed by name."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import cmmerge, compose

from cmmerge.config.ids import stage_dirs
from cmmerge.io import transaction

README = Path(__file__).resolve().parents[1] / "README.md"

# Commands that need what these offline machines or the test cannot have, each with its reason.
OFFLINE = {
    "cmmerge pipeline experiment=replicate-cpu model.name_or_path=/tmp/me5_small "
    "data.root=../shared/data": "multilingual-e5-small and the full data sets",
    "cmmerge sweep hydra/launcher=joblib hydra.launcher.n_jobs=4 lambda=0.1,0.3,0.5,0.7,1.0 "
    "method=tv,ties seed=0,1,2 run.name=hi": "30 jobs; tests/test_launchers.py runs joblib",
    "cmmerge sweep hydra/launcher=slurm hydra.launcher.partition=gpu lambda=0.1,0.3,0.5,0.7,1.0 "
    "method=tv,ties seed=0,1,2 run.name=hi": "a SLURM cluster",
    "cmmerge pipeline experiment=paper-arms": "run by tests/test_experiments.py",
    "cmmerge pipeline experiment=no-labels": "2.5 min of training on the tiny models: "
    "tests/test_no_labels.py runs it with the fast test settings",
}

# The README's placeholders, filled by the test.
PLACEHOLDERS = ("DIR", "DIR1", "DIR2", "OUT")


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """``(command, expected stderr or None)`` in README order: lines of bash blocks, `$` lines
    of console blocks (with the line printed after them), and commands in table cells."""
    out: list[tuple[str, str | None]] = []
    blocks = re.split(r"^```(\w*)\n", text, flags=re.M)
    for i in range(0, len(blocks), 2):
        prose = blocks[i] if i == 0 else blocks[i].split("```\n", 1)[-1]
        if i > 0:
            lang, body = blocks[i - 1], blocks[i].split("```\n", 1)[0]
            lines = body.splitlines()
            if lang == "bash":
                commands = [line for line in lines if line.startswith("cmmerge ")]
                out += [(_strip_comment(line), None) for line in commands]
            elif lang == "console":
                for j, line in enumerate(lines):
                    if line.startswith("$ cmmerge "):
                        out.append((line[2:].strip(), lines[j + 1].strip()))
        for row in prose.splitlines():
            if row.startswith("|"):
                out += [(c, None) for c in re.findall(r"`(cmmerge [^`]+)`", row)]
    return [(" ".join(c.replace("\\|", "|").split()), e) for c, e in out]


def _strip_comment(line: str) -> str:
    return line.split(" # ", 1)[0].strip()


def _argv(command: str, fill: dict[str, str]) -> list[str]:
    words = shlex.split(command)[1:]
    out = []
    for word in words:
        key, _, value = word.partition("=")
        for name in sorted(PLACEHOLDERS, key=len, reverse=True):
            value = re.sub(rf"\b{name}\b", fill[name], value)
        if "|" in value and not value.startswith("["):  # "tv|ties": alternatives, take one
            value = value.split("|")[0]
        out.append(f"{key}={value}" if _ else word)
    return out


def _promised(argv: list[str], cwd: Path) -> list[Path]:
    """The folders (or files) a command promises, from the same composed config."""
    stage, overrides = argv[0], [a for a in argv[1:] if "=" in a]
    if stage == "sweep":  # a multirun: its values are lists, not one config
        name = next((a.split("=", 1)[1] for a in overrides if a.startswith("run.name=")), "default")
        return [cwd / "runs" / name / "sweep" / "summary.csv"]
    cfg = compose(stage, [*overrides, f"run.root={cwd / 'runs'}"])
    dirs = stage_dirs(cfg)
    if stage == "merge" and cfg.get("output"):
        return [Path(cfg.output)]
    if stage in ("cpt", "extract", "merge", "finetune", "data"):
        return [dirs[stage]]
    if stage == "evaluate":
        return [dirs["evaluate"] / t for t in (cfg.get("eval_tasks") or [cfg.task.name])]
    if stage in ("report", "pipeline"):
        return [dirs["report"]]
    if stage == "prompt":
        from cmmerge.config.specs import PromptSpec

        return [dirs["run"] / "prompt" / PromptSpec.from_config(cfg).folder_id]
    return []


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, model_cache):
    """A scratch folder with the placeholders' models: the tiny encoder and two copies."""
    from cmmerge.config.inputs import resolve_model

    root = tmp_path_factory.mktemp("readme")
    base = resolve_model(compose("finetune", []))
    fill = {"DIR": str(root / "base"), "OUT": str(root / "merged")}
    shutil.copytree(base, root / "base")
    for name in ("DIR1", "DIR2"):
        shutil.copytree(base, root / name.lower())
        fill[name] = str(root / name.lower())
    return root, fill


def test_readme_lists_its_commands_and_offline_ones_by_name():
    commands = [c for c, _ in readme_commands(README.read_text())]
    assert len(commands) > 30
    for command in OFFLINE:
        assert command in commands, f"stale OFFLINE entry: {command}"
    stages = {c.split()[1] for c in commands}
    assert {"data", "cpt", "extract", "merge", "finetune", "evaluate", "sweep", "prompt",
            "pipeline", "report", "status"} <= stages  # fmt: skip


@pytest.mark.slow  # every command of the README, a few minutes: `pytest -m slow`
def test_every_readme_command_runs_and_makes_what_it_promises(scratch):
    root, fill = scratch
    for command, expected in readme_commands(README.read_text()):
        if command in OFFLINE:
            continue
        argv = _argv(command, fill)
        proc = cmmerge(*argv, cwd=root)  # as typed in root, run by cli.main in this process
        if expected is not None:  # a mistake shown with its message
            assert proc.returncode == 2, (command, proc.stderr[-2000:])
            assert proc.stderr.strip() == expected, command
            continue
        assert proc.returncode == 0, (command, proc.stdout[-1500:], proc.stderr[-3000:])
        for path in _promised(argv, root):
            if path.name.endswith(".csv"):
                assert path.is_file(), (command, path)
            else:
                assert transaction.problem(path) is None, (command, path)
        if argv[0] == "status":
            assert "# cmmerge status" in proc.stdout and "| finished |" in proc.stdout
