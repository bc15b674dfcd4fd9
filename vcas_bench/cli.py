"""``vcas-bench``: compose the config, check it, resolve the samplers, call :func:`vcas_bench.train.run.run`.

Problems with the command line (unknown task/model/sampler, a setting that does not exist, a
negative learning rate, ...) are reported in one line each before any data or model is loaded (exit 2);
so are problems found once the data has loaded (a batch larger than the training set). SIGINT/SIGTERM
stop a run at the next step boundary (exit 130/143), a diverged run ends in one line (exit 1).
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
from hydra.types import RunMode
from omegaconf import DictConfig

from vcas_bench.config import GROUPS, SETTING_RULES, register_schemas, sampler_specs, validate
from vcas_bench.errors import RunDiverged, RunInterrupted, UsageError


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
        if unknown:
            # An unknown setting: compose it as an addition so that validate() names the valid ones.
            added = [f"+{o}" if o.startswith(unknown.group(1) + "=") else o for o in overrides]
            if added != overrides:
                return compose_errors(added)
        return [hydra_error_line(err)]
    from vcas_bench.preflight import preflight_errors

    return validate(cfg) or preflight_errors(cfg)


def hydra_error_line(err: Exception) -> str:
    """Hydra's composition error as one line naming the key and the value (``key=value: must be ...``)."""
    merging = re.match(r"Error merging override [+~]*(\S+?)=(.*)", str(err))
    cause = str(err.__cause__ or "").strip().splitlines()
    if merging:
        key, value = merging.groups()
        if key in SETTING_RULES:
            return SETTING_RULES[key].message(key, value)
        if "ListConfig" in str(err.__cause__):
            return f"{key}={value}: must be a list, e.g. {key}=[{value}]"
        return f"{key}={value}: {cause[0] if cause else 'not a valid value'}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return ": ".join(lines[:2])  # Hydra's first two lines name the problem and its cause


def fail(errors: list[str]) -> None:
    for error in errors:
        print(f"vcas-bench: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from vcas_bench.preflight import preflight_errors

    errors = validate(cfg)
    errors = errors or preflight_errors(cfg)
    if errors:
        fail(errors)
    from vcas_bench.assets import MissingAsset
    from vcas_bench.train.run import run  # heavy imports only once the config is known to be good

    out_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, out_dir, sampler_specs(cfg, CONF_DIR))  # baselines' settings from conf/sampler/
    except (UsageError, MissingAsset) as err:  # found while loading: the data, a bad local copy
        fail([str(err)])
    except RunInterrupted as stop:
        print(f"vcas-bench: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except RunDiverged as err:
        print(f"vcas-bench: diverged: {err}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep goes on; status.json marks this job
            sys.exit(1)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        errors = check_command_line(sys.argv[1:])
        if errors:
            fail(errors)
        hydra_main()
    except KeyboardInterrupt:  # before training started, or a second signal (the first waits for the step)
        print("vcas-bench: interrupted; stopped at once, nothing saved at the interrupt", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
