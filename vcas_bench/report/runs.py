"""The one reader of run folders: what ``run_one`` leaves in ``<comparison>/<job>/`` as a :class:`RunFolder`.

A run folder holds ``metrics.json`` (always), ``train_log.csv``, ``sampler_log.csv`` (variance phases),
``variance_log.csv`` (the variance monitor) and, when Hydra made it, ``.hydra/overrides.yaml`` (in the
run folder, or in the comparison folder above it). The logs are read when first asked for, so listing
every run under ``results/`` reads only the metrics. Plots, tables and ``scripts/combine_runs.py`` read
through here; :data:`METHOD_ORDER` is the order every one of them lists samplers in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

__all__ = ["METHOD_ORDER", "RunFolder", "effective_tau", "find_runs", "finite_number", "method_rank",
           "read_comparison", "read_run", "setting_label", "sort_runs"]

# Baselines first, then the data-level pruner, then VCAS and its preset; unknown samplers after, by name.
METHOD_ORDER = ("exact", "sb", "ub", "infobatch", "vcas", "vcas-plus")


def method_rank(sampler: str) -> int:
    """Where ``sampler`` stands in :data:`METHOD_ORDER` (unknown ones after all known)."""
    return METHOD_ORDER.index(sampler) if sampler in METHOD_ORDER else len(METHOD_ORDER)


@dataclass(frozen=True)
class RunFolder:
    """One finished run: its metrics, and its logs and Hydra overrides on demand (None when absent)."""

    path: Path
    metrics: dict[str, Any] = field(repr=False)

    @property
    def sampler(self) -> str:
        return str(self.metrics["sampler"])

    @property
    def settings(self) -> dict[str, Any]:
        """The sampler's own settings (``sampler_settings``)."""
        return self.metrics.get("sampler_settings") or {}

    @property
    def label(self) -> str:
        """The sampler, or ``sampler (job)`` when the folder is named after something else (an ablation of
        one sampler's options, e.g. ``vcas-plus (fixed-F)``)."""
        return self.sampler if self.path.name == self.sampler else f"{self.sampler} ({self.path.name})"

    @cached_property
    def train_log(self) -> pd.DataFrame | None:
        return _csv(self.path / "train_log.csv")

    @cached_property
    def sampler_log(self) -> pd.DataFrame | None:
        return _csv(self.path / "sampler_log.csv")

    @cached_property
    def variance_log(self) -> pd.DataFrame | None:
        return _csv(self.path / "variance_log.csv")

    @cached_property
    def overrides(self) -> tuple[str, ...]:
        """The command-line overrides Hydra recorded for this run (its own, else its comparison's)."""
        for folder in (self.path, self.path.parent):
            recorded = folder / ".hydra" / "overrides.yaml"
            if recorded.exists():
                return tuple(str(o) for o in yaml.safe_load(recorded.read_text()) or ())
        return ()


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def read_run(metrics_path: Path) -> RunFolder | None:
    """The run whose ``metrics.json`` this is; None (with a warning) if it cannot be read or names no
    sampler."""
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("skipping %s: %s", metrics_path, error)
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("sampler"), str):
        log.warning("skipping %s: no sampler", metrics_path)
        return None
    return RunFolder(Path(metrics_path).parent, metrics)


def sort_runs(runs: Iterable[RunFolder]) -> list[RunFolder]:
    """In :data:`METHOD_ORDER`, then by label (``vcas-plus`` before ``vcas-plus (fixed-F)``)."""
    return sorted(runs, key=lambda run: (method_rank(run.sampler), run.label))


def read_comparison(folder: Path) -> list[RunFolder]:
    """Every run directly under ``folder`` (``<folder>/*/metrics.json``), in method order."""
    found = (read_run(path) for path in sorted(Path(folder).glob("*/metrics.json")))
    return sort_runs(run for run in found if run is not None)


def find_runs(results_dir: Path, skip: Iterable[str] = ()) -> list[RunFolder]:
    """Every run under ``results_dir``, in path order, except under the top-level ``skip`` folders."""
    results_dir, skip = Path(results_dir), frozenset(skip)
    paths = sorted(p for p in results_dir.rglob("metrics.json")
                   if not skip & set(p.relative_to(results_dir).parts[:1]))
    return [run for run in (read_run(p) for p in paths) if run is not None]


def setting_label(metrics: dict[str, Any]) -> str:
    """``rt-polarity / minilm / 150 steps, bs 32 (CPU proxy)``: where one of our numbers comes from."""
    device = str(metrics.get("device") or "")
    hardware = "CPU " if device.startswith("cpu") else ("GPU " if device else "")
    return (f"{metrics.get('task', '?')} / {metrics.get('model', '?')} / {metrics.get('steps', '?')} steps, "
            f"bs {metrics.get('batch_size', '?')} ({hardware}proxy)")


def finite_number(value: Any) -> float | None:
    """A finite number, or None (absent, null, text, a flag, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def effective_tau(settings: dict[str, Any]) -> tuple[float | None, float | None]:
    """(τ_act, τ_w) a VCAS run used: each falls back to ``tau`` when unset; (None, None) for the others."""
    tau = finite_number(settings.get("tau"))
    act, w = finite_number(settings.get("tau_act")), finite_number(settings.get("tau_w"))
    return (tau if act is None else act), (tau if w is None else w)
