"""Config schemas (registered in Hydra's ConfigStore) and the checks that run before any training.

The YAML under ``conf/`` is validated twice: Hydra checks types and keys against the dataclasses
below when it composes; :func:`validate` then checks values and names (task, model, sampler, the
builders' keyword arguments, the sampler's settings) and reports every problem at once.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class GlueEvalConfig:
    """``task.glue_eval``: which GLUE task to fine-tune on after pretraining, and how."""

    task: str | None = None  # sst2 | mnli | qqp | qnli; None: no GLUE evaluation
    steps: int = 1000  # exact fine-tuning steps
    batch_size: int = 32
    lr: float = 2e-5  # the paper's BERT fine-tuning recipe (App. F.2): AdamW, wd 0.01, linear, warm-up 0.1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    data_dir: str | None = None  # null: the hub's nyu-mll/glue; else the task's local folder
    train_size: int | None = None
    eval_size: int | None = None


@dataclass
class TaskConfig:
    name: str = MISSING
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task builder
    num_labels: int = 2
    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    vcas_F: int | None = None  # the paper's per-task adaptation period, if it gives one
    glue_eval: GlueEvalConfig = field(default_factory=GlueEvalConfig)  # masked-LM pretraining: GLUE after it


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 2e-5
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    schedule: str = "linear"  # linear | constant
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    block_type: str | None = None  # the repeated block VCAS wraps; None: the builder's (bundle.block_type)
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model builder
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # cap on optimizer steps (None: the task's epochs)
    eval_every_epoch: bool = True
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True
    flops_every: int = 10  # count FLOPs on every n-th step and every other phase (0: never)
    time_detail: bool | None = None  # time forward and backward apart (None: on CPU only, where it is free)
    accumulate: int = 1  # micro-batches of task.batch_size per optimizer step (effective batch x accumulate)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast forward; fp16 adds a GradScaler)
    checkpoint_every: int = 0  # optimizer steps between checkpoints in <run dir>/checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: str | None = None  # null | auto (latest in this output dir) | a checkpoint file or output dir
    stop_after: int | None = None  # stop (checkpointed, unfinished) after this many steps in this process


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: dict[str, Any] = field(default_factory=dict)  # name + the sampler's own settings
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    baselines: list[str] = field(default_factory=list)  # samplers run first, same seed and data
    seed: int = 0
    name: str | None = None  # the experiment's name, recorded in metrics.json
    logger: str | None = None  # None | wandb
    output_dir: str | None = None  # None: Hydra's run directory


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _builder_errors(kind: str, name: str, registry, args: dict[str, Any], fixed: set[str]) -> list[str]:
    if name not in registry:
        return [f"unknown {kind} {name!r}; valid {kind}s: {', '.join(registry.names())}"]
    params = inspect.signature(registry.get(name)).parameters
    valid = sorted(set(params) - fixed)
    return [f"{kind} {name!r} has no argument {key!r}; valid: {', '.join(valid)}"
            for key in args if key not in params or key in fixed]


def sampler_errors(spec: dict[str, Any]) -> list[str]:
    """Problems with one sampler node (``{"name": ..., **settings}``)."""
    from vcas_bench.samplers import SAMPLERS

    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        return [f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS.names())}"]
    settings = SAMPLERS.get(name).Settings
    valid = list(inspect.signature(settings).parameters)
    unknown = [f"sampler {name!r} has no setting {k!r}; valid: {', '.join(valid) or 'none'}"
               for k in spec if k not in valid]
    if unknown:
        return unknown
    try:
        settings(**spec)
    except (TypeError, ValueError) as err:
        return [str(err)]
    return []


def _glue_eval_errors(cfg: DictConfig) -> list[str]:
    from vcas_bench.train.glue_eval import glue_eval_errors

    return glue_eval_errors(OmegaConf.to_container(cfg.task.glue_eval, resolve=True), cfg.task.name)


def validate(cfg: DictConfig) -> list[str]:
    """Every problem with a composed config, as one-line messages (empty when it is valid)."""
    from vcas_bench.models import MODELS
    from vcas_bench.tasks import TASKS, compatibility_error

    errors = _builder_errors("task", cfg.task.name, TASKS, cfg.task.args,
                             {"seed", "tokenizer", "image_size", "num_channels"})
    errors += _builder_errors("model", cfg.model.name, MODELS, cfg.model.args, {"num_labels", "mlm"})
    mismatch = compatibility_error(cfg.task.name, cfg.model.name)
    errors += [mismatch] if mismatch else []
    errors += sampler_errors(OmegaConf.to_container(cfg.sampler, resolve=True))
    errors += _glue_eval_errors(cfg)
    optim, task, trainer = cfg.model.optim, cfg.task, cfg.trainer
    checks = {
        "model.optim.lr must be > 0": optim.lr > 0,
        "model.optim.weight_decay must be >= 0": optim.weight_decay >= 0,
        "model.optim.warmup_ratio must be in [0, 1)": 0 <= optim.warmup_ratio < 1,
        "model.optim.name must be one of adamw, adam, sgd": optim.name in ("adamw", "adam", "sgd"),
        "model.optim.schedule must be one of linear, constant": optim.schedule in ("linear", "constant"),
        "task.epochs must be > 0": task.epochs > 0,
        "task.batch_size must be >= 1": task.batch_size >= 1,
        "model.args.backend must be one of hf, timm": cfg.model.args.get("backend", "hf") in ("hf", "timm"),
        "trainer.max_steps must be >= 1": trainer.max_steps is None or trainer.max_steps >= 1,
        "trainer.flops_every must be >= 0": trainer.flops_every >= 0,
        "trainer.accumulate must be >= 1": trainer.accumulate >= 1,
        "trainer.precision must be one of fp32, bf16, fp16": trainer.precision in ("fp32", "bf16", "fp16"),
        "trainer.checkpoint_every must be >= 0": trainer.checkpoint_every >= 0,
        "trainer.keep_checkpoints must be >= 1": trainer.keep_checkpoints >= 1,
        "trainer.stop_after must be >= 1 and needs trainer.checkpoint_every > 0":
            trainer.stop_after is None or (trainer.stop_after >= 1 and trainer.checkpoint_every > 0),
        "trainer.device must be one of auto, cpu, cuda": trainer.device in ("auto", "cpu", "cuda"),
        "logger must be null or wandb": cfg.logger in (None, "wandb"),
    }
    errors += [message for message, ok in checks.items() if not ok]
    if trainer.resume not in (None, "auto") and not Path(trainer.resume).exists():
        errors.append(f"trainer.resume={trainer.resume}: no such checkpoint file or output directory "
                      "(null, auto, or a path)")
    if cfg.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        errors.append("logger=wandb needs the wandb package: pip install 'vcas-bench[wandb]'")
    for name in cfg.baselines:
        errors += [f"baselines: {e}" for e in sampler_errors({"name": name})]
    return errors
