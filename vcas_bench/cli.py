"""``vcas-bench``: compose the config, check it, call :func:`vcas_bench.train.run.run`, exit.

Problems with the command line (unknown task/model/sampler, a setting that does not exist, a
negative learning rate, ...) are reported in one line each before any data or model is loaded.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vcas_bench.config import register_schemas, validate

GROUPS = ("task", "model", "sampler", "experiment")


def find_conf_dir() -> Path:
    """``conf/`` of a checkout (editable install), else the copy packaged as ``vcas_bench.conf``."""
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "config.yaml").exists():
        return checkout
    return Path(str(resources.files("vcas_bench") / "conf"))


CONF_DIR = find_conf_dir()
register_schemas()


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_command_line(args: list[str]) -> list[str]:
    """Unknown group choices (``task=nope``), anything Hydra or :func:`validate` rejects, and (offline)
    hub assets that are not cached."""
    errors = []
    overrides = [a for a in args if not a.startswith("-") and not a.startswith("hydra")]
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in GROUPS:
            for choice in value.split(","):  # multirun sweeps list several
                if choice and choice != "null" and choice not in group_choices(key):
                    errors.append(f"unknown {key} {choice!r}; valid {key}s: {', '.join(group_choices(key))}")
    if errors or any(is_sweep(a) for a in overrides):
        return errors  # sweeps are checked job by job once Hydra expands them
    return compose_errors(overrides)


def is_sweep(override: str) -> bool:
    """``key=a,b`` sweeps; a comma inside a list value (``key=[a,b]``) does not."""
    return "," in re.sub(r"\[[^\]]*\]", "", override.partition("=")[2])


def compose_errors(overrides: list[str]) -> list[str]:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as err:
        unknown = re.match(r"Could not override '([\w.]+)'", str(err))
        if unknown and unknown.group(1).startswith(("sampler.", "task.args.", "model.args.")):
            # An unknown setting: compose it as an addition so that validate() names the valid ones.
            added = [f"+{o}" if o.startswith(unknown.group(1) + "=") else o for o in overrides]
            return compose_errors(added)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return [": ".join(lines[:2])]  # Hydra's first two lines name the problem and its cause
    from vcas_bench.preflight import offline_errors

    return validate(cfg) or offline_errors(cfg)


def fail(errors: list[str]) -> None:
    for error in errors:
        print(f"vcas-bench: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from vcas_bench.assets import MissingAsset
    from vcas_bench.preflight import offline_errors

    errors = validate(cfg)
    errors = errors or offline_errors(cfg)
    if errors:
        fail(errors)
    from vcas_bench.train.run import run  # heavy imports only once the config is known to be good

    out_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, out_dir, CONF_DIR)
    except MissingAsset as err:  # found only while loading (online but unreachable, a bad local copy)
        fail([str(err)])


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    errors = check_command_line(sys.argv[1:])
    if errors:
        fail(errors)
    hydra_main()


if __name__ == "__main__":
    main()
