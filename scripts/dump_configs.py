"""Dump the config every command composes, with every experiment and a few group choices, to
one JSON file (key order kept): run it at two commits and compare the files to show that a
change of the config layer moved no value (`python scripts/dump_configs.py before.json`, then
`python scripts/dump_configs.py after.json --compare before.json`)."""

from __future__ import annotations

import argparse
import json
import sys

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cmmerge.presets import group_options

COMMANDS = ["cpt", "data", "extract", "merge", "finetune", "evaluate", "graft", "prompt"]
COMMANDS += ["report", "status", "sweep", "pipeline"]
GROUPS = [["model=tiny-llama"], ["model=gemma3-270m"], ["method=dare_ties"], ["peft=lora"]]


def dump() -> dict[str, dict]:
    """{"<command> <overrides>": the composed config (the hydra node without its runtime)}."""
    variants = [[]] + [[f"experiment={e}"] for e in group_options("experiment")] + GROUPS
    out = {}
    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        for command in COMMANDS:
            for overrides in variants:
                cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
                config = OmegaConf.to_container(cfg, resolve=False)
                config["hydra"].pop("runtime", None)
                out[" ".join([command, *overrides])] = config
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--compare", help="an earlier dump: list the configs that differ")
    args = parser.parse_args()
    configs = json.loads(json.dumps(dump(), default=str))
    with open(args.out, "w") as fh:
        json.dump(configs, fh, indent=1)
    print(f"{len(configs)} configs -> {args.out}")
    if not args.compare:
        return 0
    with open(args.compare) as fh:
        before = json.load(fh)
    differ = [k for k in before if json.dumps(before[k]) != json.dumps(configs.get(k))]
    for key in differ:
        print(f"differs (values or key order): {key}")
    print(f"{len(differ)} of {len(before)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
