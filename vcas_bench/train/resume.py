"""Which checkpoint a resume continues from, and whether it was written with the same settings.

Every checkpoint (and every ``metrics.json``) holds the run's settings: the resolved config flattened to
``key: value``, the sampler's own settings under ``sampler.*``, without the keys that only say where or
how long a process runs (``output_dir``, ``trainer.resume``, ``trainer.stop_after``, ...). A resume
whose settings differ is refused in one line listing the differences, unless
``trainer.resume_force=true`` (recorded in ``metrics.json``). A checkpoint that cannot be read is named
and set aside (``*.corrupt``), and the previous one is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vcas_bench.config import NOT_COMPARED
from vcas_bench.errors import UsageError
from vcas_bench.rules import show
from vcas_bench.train.state import UnreadableCheckpoint, checkpoints, load_checkpoint

__all__ = [
    "Resume",
    "find_resume",
    "project_version",
    "run_settings",
    "settings_differences",
    "check_resume_target",
]


def project_version() -> str:
    try:
        return metadata.version("vcas-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_settings(cfg: DictConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """What decides the results of the run of sampler ``spec``, flattened (``seed``, ``sampler.tau``)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree["sampler"] = spec  # a baseline's own settings, not the sampler under test's
    flat = _flatten(tree)
    return {
        key: value
        for key, value in flat.items()
        if not any(key == skip or key.startswith(skip + ".") for skip in NOT_COMPARED)
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every setting that differs (``saved`` None: an unrecorded checkpoint)."""
    if saved is None:
        return ["settings not recorded in the checkpoint"]
    keys = sorted(set(saved) | set(now))
    return [
        f"{key}: {show(saved.get(key))} -> {show(now.get(key))}"
        for key in keys
        if saved.get(key) != now.get(key)
    ]


@dataclass
class Resume:
    """Where a run continues from; ``forced``: the differences that ``trainer.resume_force`` let through."""

    path: Path
    checkpoint: dict[str, Any]
    forced: list[str] = field(default_factory=list)


def find_resume(
    resume: str | None,
    run_dir: Path,
    sampler: str,
    settings: dict[str, Any],
    force: bool,
    writer: bool = True,
) -> Resume | None:
    """The checkpoint ``trainer.resume`` points to for the run of ``sampler`` in ``run_dir``, checked.

    ``auto``: the newest readable one in this run's own ``checkpoints/`` (none: start afresh). A directory:
    an earlier command's output directory, searched the same way. A file: that checkpoint, for the run
    whose sampler wrote it (the other samplers of a comparison start afresh). Only the ``writer`` (DDP
    rank 0) reports and sets aside unreadable files.
    """
    if resume is None:
        return None
    path = Path(resume)
    if resume == "auto" or path.is_dir():  # only this command's own files (it holds their lock) are moved
        own = resume == "auto"
        found = _newest_readable(run_dir if own else path / sampler, report=writer, set_aside=own and writer)
    else:
        checkpoint = load_checkpoint(path)  # unreadable: UnreadableCheckpoint names the file
        found = Resume(path, checkpoint) if checkpoint["sampler"] == sampler else None
    if found is not None:
        found.forced = check_settings(found, settings, force, f"trainer.resume={resume}")
    return found


def check_settings(found: Resume, settings: dict[str, Any], force: bool, what: str) -> list[str]:
    """Refuse (one line) a checkpoint written with other settings unless ``force``; return the differences."""
    differences = settings_differences(found.checkpoint.get("config"), settings)
    if differences and not force:
        raise UsageError(
            f"{what}: {found.path} was written with other settings ({'; '.join(differences)}); "
            "resume with the same settings, or add trainer.resume_force=true to continue anyway"
        )
    return differences


def _newest_readable(run_dir: Path, report: bool, set_aside: bool) -> Resume | None:
    """The newest checkpoint that loads; each unreadable newer one is named in one line (and set aside)."""
    found = checkpoints(run_dir)
    for index in range(len(found) - 1, -1, -1):
        try:
            return Resume(found[index], load_checkpoint(found[index]))
        except UnreadableCheckpoint as err:
            fallback = found[index - 1] if index else None
            then = f"using {fallback.name}" if fallback else "no older checkpoint: starting afresh"
            aside = f"set aside as {found[index].name}.corrupt, " if set_aside else ""
            if report:
                print(f"vcas-bench: {err}; {aside}{then}", file=sys.stderr)
            if set_aside:
                found[index].rename(found[index].with_name(found[index].name + ".corrupt"))
    return None


def check_resume_target(resume: str | None, samplers: list[str]) -> None:
    """A ``trainer.resume`` path must hold a run of one of this comparison's ``samplers``."""
    if resume in (None, "auto"):
        return
    path = Path(resume)
    if path.is_file():
        owner = load_checkpoint(path)["sampler"]
        if owner not in samplers:
            raise UsageError(
                f"trainer.resume={resume}: a checkpoint of sampler {owner!r}, but this command "
                f"runs {', '.join(samplers)}; resume it with sampler={owner}"
            )
        return
    held = [s for s in samplers if checkpoints(path / s) or (path / s / "metrics.json").exists()]
    if not held:
        others = sorted(p.parent.parent.name for p in path.glob("*/checkpoints/step_*.pt"))
        holds = f"it holds {', '.join(dict.fromkeys(others))}" if others else "it holds no checkpoint"
        raise UsageError(f"trainer.resume={resume}: no run of {', '.join(samplers)} to resume ({holds})")
