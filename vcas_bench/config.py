"""Config schemas (registered in Hydra's ConfigStore), the checks that run before any training, and
what the edge resolves for the runner.

The YAML under ``conf/`` is validated twice: Hydra checks types and keys against the dataclasses
below when it composes; :func:`validate` then checks names (task, model, sampler, the builders' keyword
arguments, the sampler's settings, keys added with ``+``) and every value against its :class:`Rule`
(type, range, what null means), and reports every problem at once, one line each.
:func:`sampler_specs` resolves the comparison's samplers (baselines from ``conf/sampler/<name>.yaml``,
the task's adaptation period) into :class:`SamplerSpec` values; nothing below the CLI reads YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vcas_bench.rules import Rule, choice, directory, existing_path, flag, integer, number, show, type_rule


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
    compile: bool = False  # torch.compile the model's forward (the sampled backward runs as it is)
    # Activation checkpointing of the blocks: plain for exact, re-run on the kept rows for VCAS/SB/UB.
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints in <run dir>/checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: str | None = None  # null | auto (latest in this output dir) | a checkpoint file or output dir
    stop_after: int | None = None  # stop (checkpointed, unfinished) after this many steps in this process
    resume_force: bool = False  # resume although result-changing settings differ (recorded in metrics)


@dataclass
class MonitorConfig:
    """``monitor``: the variance monitor of any sampler (vcas_bench/train/monitor.py), off by default."""

    enabled: bool = False
    every: int | None = None  # steps between measurements; None: task.vcas_F, else min(500, steps/50)
    batches: int = 2  # fresh batches per measurement (VCAS's M)
    draws: int | None = None  # sampler draws per batch; None: as many as batches
    param_sample_ratio: float = 0.01  # of the block weights' entries (VCAS's default)


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: dict[str, Any] = field(default_factory=dict)  # name + the sampler's own settings
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    baselines: list[str] = field(default_factory=list)  # samplers run first, same seed and data
    seed: int = 0
    name: str | None = None  # the experiment's name, recorded in metrics.json
    logger: str | None = None  # None | wandb | tensorboard (vcas_bench/train/loggers.py)
    output_dir: str | None = None  # None: Hydra's run directory


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler of a comparison, resolved at the edge."""

    name: str
    configured: dict[str, Any]  # its settings as configured: recorded in metrics.json, compared on resume
    # Its ``Settings`` dataclass built from them, with the task's adaptation period (``task.vcas_F``) when
    # the sampler has an ``F`` setting left unset.
    settings: Any


def sampler_specs(cfg: DictConfig, conf_dir: Path | None = None) -> list[SamplerSpec]:
    """The samplers of this comparison, baselines first, then ``cfg.sampler``.

    A baseline's settings come from ``<conf_dir>/sampler/<name>.yaml``; without ``conf_dir`` (library
    callers, tests) or such a file, from its ``Settings`` defaults.
    """
    main = OmegaConf.to_container(cfg.sampler, resolve=True)
    nodes = []
    for name in cfg.baselines:
        if name != main["name"]:
            path = conf_dir / "sampler" / f"{name}.yaml" if conf_dir else None
            known = path is not None and path.exists()
            nodes.append(OmegaConf.to_container(OmegaConf.load(path)) if known else {"name": name})
    return [_sampler_spec(node, cfg.task.vcas_F) for node in [*nodes, main]]


def _sampler_spec(node: dict[str, Any], task_F: int | None) -> SamplerSpec:
    from vcas_bench.samplers import sampler_settings

    configured = {key: value for key, value in node.items() if key != "name"}
    settings = sampler_settings(node["name"])(**configured)
    if task_F and getattr(settings, "F", 0) is None:  # the period left to the task
        settings = dataclasses.replace(settings, F=task_F)
    return SamplerSpec(node["name"], configured, settings)


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


# Where, how long and how visibly a process runs: changing these between a stop and a resume does not
# change what the resumed run computes (train/resume.py), nor do they tell two sweep jobs apart
# (report/sweeps.py).
NOT_COMPARED = (
    "output_dir",
    "name",
    "logger",
    "baselines",
    "trainer.resume",
    "trainer.resume_force",
    "trainer.stop_after",
    "trainer.progress",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.num_threads",
    "trainer.time_detail",
    "trainer.flops_every",
    "trainer.device",
)

GROUPS = ("task", "model", "sampler", "experiment")  # the config groups a command picks from (conf/<group>/)
LOGGER_PACKAGES = {  # logger= choice -> the module it imports, also its pip extra (train/loggers.py)
    "wandb": "wandb",
    "tensorboard": "tensorboard",
}

# What each typed setting accepts (Hydra has checked its type; these add ranges, choices, null meanings).
SETTING_RULES: dict[str, Rule] = {
    "seed": integer(0, 2**32 - 1),  # numpy's and sklearn's seeds are 32-bit
    "logger": choice(*LOGGER_PACKAGES, null="no logger"),
    "task.num_labels": integer(1),
    "task.epochs": number(0, open_low=True),
    "task.batch_size": integer(1),
    "task.eval_batch_size": integer(1),
    "task.vcas_F": integer(1, null="the sampler's own period"),
    "task.glue_eval.data_dir": directory(null="the hub's nyu-mll/glue"),
    "model.optim.name": choice("adamw", "adam", "sgd"),
    "model.optim.lr": number(0, open_low=True),
    "model.optim.weight_decay": number(0),
    "model.optim.momentum": number(0, 1, open_high=True),
    "model.optim.schedule": choice("linear", "constant"),
    "model.optim.warmup_ratio": number(0, 1, open_high=True),
    "model.optim.max_grad_norm": number(0, open_low=True, null="no clipping"),
    "trainer.max_steps": integer(1, null="task.epochs decides"),
    "trainer.eval_every_epoch": flag(),
    "trainer.progress": flag(),
    "trainer.time_detail": flag(null="on CPU only"),
    "trainer.resume_force": flag(),
    "trainer.device": choice("auto", "cpu", "cuda"),
    "trainer.num_threads": integer(1, null="torch's default"),
    "trainer.flops_every": integer(0),
    "trainer.accumulate": integer(1),
    "trainer.precision": choice("fp32", "bf16", "fp16"),
    "trainer.compile": flag(),
    "trainer.gradient_checkpointing": flag(),
    "trainer.checkpoint_every": integer(0),
    "trainer.keep_checkpoints": integer(1),
    "trainer.stop_after": integer(1, null="run to the end"),
    "monitor.enabled": flag(),
    "monitor.every": integer(1, null="task.vcas_F, else min(500, steps/50)"),
    "monitor.batches": integer(2),  # a variance needs two batches
    "monitor.draws": integer(2, null="as many as monitor.batches"),
    "monitor.param_sample_ratio": number(0, 1, open_low=True),
}

# Builder keyword arguments (task.args, model.args) by name; others are checked against their annotation.
ARG_RULES: dict[str, Rule] = {
    "train_size": integer(1, null="every row"),
    "eval_size": integer(1, null="every row"),
    "max_length": integer(2),  # room for [CLS] and [SEP]
    "data_dir": directory(null="the hub's copy"),
    "path": existing_path(null="the hub's checkpoint"),
    "tokenizer_path": directory(null="the packaged tokenizer"),
    "dropout": number(0, 1, open_high=True, null="the model's own"),
    "mlm_probability": number(0, 1, open_low=True, open_high=True),
    "eval_split": choice("matched", "mismatched"),
    "backend": choice("hf", "timm"),
    **{key: integer(1) for key in ("image_size", "patch_size", "num_channels", "widen_factor", "base_width")},
}

VCAS_RULES: dict[str, Rule] = {
    "tau": number(0),
    "tau_act": number(0, null="tau"),
    "tau_w": number(0, null="tau"),
    "alpha": number(0, 1, open_low=True),
    "beta": number(0, 1, open_low=True, open_high=True),
    "M": integer(2),  # a variance needs two batches
    "F": integer(1, null="task.vcas_F, else min(500, steps/50)"),
    "rho_ema": number(0, 1, open_high=True),
    "param_sample_ratio": number(0, 1, open_low=True),
    "variance_subset": choice("entries", "rows"),
    "reuse_forward": flag(),
    "fold_batch": flag(),
    "alpha_max": number(0, 1, open_low=True, null="a fixed step alpha"),
    "beta_min": number(0, 1, open_low=True, open_high=True, null="a fixed multiplier beta"),
    "F_max_factor": integer(1, null="a fixed period F"),
    "static_shapes": flag(),
}
# Bounds one setting puts on another: key -> (partner, how key compares to it).
PAIRED_SETTINGS = {"alpha_max": ("alpha", ">="), "beta_min": ("beta", "<=")}
SAMPLER_RULES: dict[str, dict[str, Rule]] = {
    "exact": {},
    "vcas": VCAS_RULES,
    "vcas-plus": VCAS_RULES,
    "sb": {"beta": number(0), "history": integer(1),
           "fixed_ratio": number(0, 1, open_low=True, null="keep by loss percentile")},
    "ub": {"ratio": number(0, 1, open_low=True), "tau_th": number(0, null="always importance-sample")},
    "infobatch": {"ratio": number(0, 1, open_high=True), "delta": number(0, 1),
                  "epochs": number(0, open_low=True, null="the run's planned epochs")},
}

# The typed nodes of the composed config; their keys must be the schema's (a `+key=...` is refused too).
SCHEMA_NODES: dict[str, type] = {"": RunConfig, "task": TaskConfig, "task.glue_eval": GlueEvalConfig,
                                 "model": ModelConfig, "model.optim": OptimConfig, "trainer": TrainerConfig,
                                 "monitor": MonitorConfig}


def setting_names() -> list[str]:
    """Every typed setting's full key (``trainer.max_steps``, ...)."""
    return [f"{node}.{f.name}".lstrip(".") for node, schema in SCHEMA_NODES.items() for f in fields(schema)]


def no_such_setting(key: str, value: Any) -> str:
    """``trainer.max_stepz=5: no such setting; did you mean trainer.max_steps?`` (one line)."""
    close = difflib.get_close_matches(key, setting_names(), n=1, cutoff=0.6)
    node = key.rpartition(".")[0]
    hint = f"did you mean {close[0]}?" if close else \
        f"valid: {', '.join(f.name for f in fields(SCHEMA_NODES.get(node, RunConfig)))}"
    return f"{key}={show(value)}: no such setting; {hint}"


def unknown_setting_errors(cfg: DictConfig) -> list[str]:
    errors = []
    for node, schema in SCHEMA_NODES.items():
        known = {f.name for f in fields(schema)}
        section = OmegaConf.select(cfg, node) if node else cfg
        errors += [no_such_setting(f"{node}.{key}".lstrip("."), section[key])
                   for key in section if key not in known]
    return errors


def _builder_errors(kind: str, name: str, registry, args: dict[str, Any], fixed: set[str]) -> list[str]:
    if name not in registry:
        return [f"unknown {kind} {name!r}; valid {kind}s: {', '.join(registry.names())}"]
    params = inspect.signature(registry.get(name)).parameters
    valid = sorted(set(params) - fixed)
    unknown = [f"{kind} {name!r} has no argument {key!r}; valid: {', '.join(valid)}"
               for key in args if key not in params or key in fixed]
    if unknown:
        return unknown
    rules = {key: ARG_RULES.get(key) or type_rule(params[key].annotation) for key in args}
    problems = (rule.problem(f"{kind}.args.{key}", args[key]) for key, rule in rules.items() if rule)
    return [p for p in problems if p]


def sampler_errors(spec: dict[str, Any], where: str = "sampler") -> list[str]:
    """Problems with one sampler node (``{"name": ..., **settings}``), each naming ``<where>.<setting>``."""
    from vcas_bench.samplers import SAMPLERS

    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SAMPLERS:
        return [f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS.names())}"]
    settings = SAMPLERS.get(name).Settings
    valid = [f.name for f in fields(settings)]
    unknown = [f"sampler {name!r} has no setting {k!r}; valid: {', '.join(valid) or 'none'}"
               for k in spec if k not in valid]
    if unknown:
        return unknown
    rules = SAMPLER_RULES.get(name, {})
    problems = [rules[k].problem(f"{where}.{k}", v) for k, v in spec.items() if k in rules]
    if any(problems):
        return [p for p in problems if p]
    merged = {**{f.name: f.default for f in fields(settings)}, **spec}
    for key, (partner, order) in PAIRED_SETTINGS.items():
        value, bound = merged.get(key), merged.get(partner)
        if value is not None and bound is not None and (value < bound if order == ">=" else value > bound):
            return [f"{where}.{key}={show(value)}: must be {order} {where}.{partner} ({show(bound)}) or null"]
    try:
        settings(**spec)  # what the rules cannot say alone: alpha <= alpha_max, beta_min <= beta
    except (TypeError, ValueError) as err:
        return [f"{where}: {err}"]
    return []


def _glue_eval_errors(cfg: DictConfig) -> list[str]:
    """One-line problems with ``task.glue_eval`` (off when its task is None)."""
    from vcas_bench.tasks import TASK_MODALITIES
    from vcas_bench.tasks.glue import SPECS

    spec = cfg.task.glue_eval
    if spec.task is None:
        return []
    errors = []
    if TASK_MODALITIES.get(cfg.task.name) != "mlm":
        errors.append(f"task.glue_eval applies to masked-LM pretraining tasks, not to {cfg.task.name!r}")
    if spec.task not in SPECS:
        errors.append(f"task.glue_eval.task={spec.task!r}; valid: {', '.join(sorted(SPECS))}")
    if spec.steps < 1 or spec.batch_size < 1 or spec.lr <= 0:
        errors.append("task.glue_eval needs steps >= 1, batch_size >= 1 and lr > 0")
    return errors


def _combination_errors(cfg: DictConfig) -> list[str]:
    """Settings valid alone but not together (checked once each value is valid)."""
    trainer, errors = cfg.trainer, []
    if trainer.stop_after is not None and trainer.checkpoint_every == 0:
        errors.append(f"trainer.stop_after={trainer.stop_after}: needs trainer.checkpoint_every > 0 "
                      "(the stop is checkpointed)")
    if trainer.resume not in (None, "auto") and not Path(trainer.resume).exists():
        errors.append(f"trainer.resume={trainer.resume}: no such checkpoint file or output directory "
                      "(null, auto, or a path)")
    if trainer.resume_force and trainer.resume is None:
        errors.append("trainer.resume_force=true: needs trainer.resume (auto or a path)")
    package = LOGGER_PACKAGES.get(cfg.logger)
    if package is not None and importlib.util.find_spec(package) is None:
        errors.append(f"logger={cfg.logger} needs the {package} package: pip install 'vcas-bench[{package}]'")
    return errors


def validate(cfg: DictConfig) -> list[str]:
    """Every problem with a composed config, as one-line messages (empty when it is valid).

    Checks names (task, model, sampler, baselines, settings and builder arguments, also ones added with
    ``+``), each value's type and range, and combinations; nothing is built or loaded.
    """
    from vcas_bench.models import MODELS
    from vcas_bench.tasks import TASKS, compatibility_error

    errors = unknown_setting_errors(cfg)
    errors += _builder_errors("task", cfg.task.name, TASKS, cfg.task.args,
                              {"seed", "tokenizer", "image_size", "num_channels"})
    errors += _builder_errors("model", cfg.model.name, MODELS, cfg.model.args, {"num_labels", "mlm"})
    mismatch = compatibility_error(cfg.task.name, cfg.model.name)
    errors += [mismatch] if mismatch else []
    errors += sampler_errors(OmegaConf.to_container(cfg.sampler, resolve=True))
    errors += _glue_eval_errors(cfg)
    problems = [rule.problem(key, OmegaConf.select(cfg, key)) for key, rule in SETTING_RULES.items()]
    errors += [p for p in problems if p]
    for name in cfg.baselines:
        errors += [f"baselines: {e}" for e in sampler_errors({"name": name}, where="baselines")]
    return errors or _combination_errors(cfg)
