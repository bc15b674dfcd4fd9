"""Hydra sweeps under ``results/``: each job labelled by the value it swept (``tau=0.025``, ``F=12``).

A sweep is a folder Hydra wrote ``multirun.yaml`` into (``vcas-bench -m ... hydra.sweep.dir=<folder>``);
its jobs are the comparison folders in it, each with the ``.hydra/overrides.yaml`` of its command. A
reference run made apart into the same folder (``<folder>/exact``, ``sampler=exact baselines=[]``) is a
job too. What tells the jobs apart is the overrides whose values differ between them, leaving out the
ones that only say where or how visibly a job ran (``trainer.progress``, ``output_dir``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vcas_bench.config import GROUPS, NOT_COMPARED
from vcas_bench.report.runs import RunFolder, read_comparison

__all__ = ["Sweep", "SweepJob", "is_sweep", "job_labels", "read_sweep"]


@dataclass(frozen=True)
class SweepJob:
    folder: Path  # the job's comparison folder
    label: str  # what it swept, e.g. "tau=0.025"; a reference job that swept nothing: its samplers
    runs: tuple[RunFolder, ...]


@dataclass(frozen=True)
class Sweep:
    folder: Path
    swept: tuple[str, ...]  # the override keys that differ between the jobs, e.g. ("sampler", "sampler.tau")
    knobs: tuple[str, ...]  # those the swept jobs set (not only a reference), e.g. ("sampler.tau",)
    jobs: tuple[SweepJob, ...]  # references first, then in the swept values' order


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / "multirun.yaml").exists()


def _parsed(overrides: tuple[str, ...]) -> dict[str, str]:
    """``key -> value`` of the overrides that can change what a job computes."""
    parsed = {}
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key.startswith("hydra.") or any(key == k or key.startswith(k + ".") for k in NOT_COMPARED):
            continue
        parsed[key] = value
    return parsed


def _short(key: str, value: str) -> str:
    """``sampler.tau=0.025`` -> ``tau=0.025``; a group choice (``sampler=exact``) -> ``exact``;
    ``seed=1`` as it is."""
    return value if key in GROUPS else f"{key.rsplit('.', 1)[-1]}={value}"


def job_labels(overrides: dict[Path, tuple[str, ...]]) -> tuple[tuple[str, ...], dict[Path, str]]:
    """The keys that differ between the jobs, and each job's label made of its values of them."""
    parsed = {job: _parsed(o) for job, o in overrides.items()}
    keys = sorted({k for p in parsed.values() for k in p})
    swept = tuple(k for k in keys if len({p.get(k) for p in parsed.values()}) > 1)
    labels = {job: ", ".join(_short(k, p[k]) for k in swept if k in p) for job, p in parsed.items()}
    return swept, labels


def _order(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order (``F=5`` before ``F=12``), then words; absent first."""
    if value is None:
        return (0, 0.0, "")
    try:
        return (1, float(value), "")
    except ValueError:
        return (2, 0.0, value)


def read_sweep(folder: Path) -> Sweep:
    """The sweep's jobs (comparison folders with at least one run), labelled and ordered."""
    folder = Path(folder)
    comparisons = {child: read_comparison(child) for child in sorted(folder.iterdir()) if child.is_dir()}
    comparisons = {child: runs for child, runs in comparisons.items() if runs}
    swept, labels = job_labels({child: runs[0].overrides for child, runs in comparisons.items()})
    jobs = [SweepJob(child, labels[child] or ", ".join(r.label for r in runs), tuple(runs))
            for child, runs in comparisons.items()]

    values = {job.folder: _parsed(job.runs[0].overrides) for job in jobs}
    knobs = tuple(k for k in swept if any(k in values[job.folder] for job in jobs if not _reference(job)))

    def rank(job: SweepJob) -> tuple:
        return (not _reference(job), [_order(values[job.folder].get(k)) for k in knobs], job.folder.name)

    return Sweep(folder, swept, knobs, tuple(sorted(jobs, key=rank)))


def _reference(job: SweepJob) -> bool:
    """A job of exact runs only: the baseline the swept jobs are measured against."""
    return all(run.sampler == "exact" for run in job.runs)
