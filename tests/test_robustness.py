"""Nothing silently wrong: bad input refused before training, interruptions recorded, resumes checked.

The table runs the real entry point (``vcas_bench.cli.main``) in process: every bad input ends with exit 2
and exactly one stderr line that names the key, no traceback, and nothing trained. The rest covers the
ends of a run: SIGINT (a real subprocess) and SIGTERM, a NaN stop, a resume with changed settings, a
checkpoint of another sampler, and a second process writing into the same output directory. (A corrupt
newest checkpoint, for every sampler: ``tests/samplers/test_registry.py``.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from vcas_bench import cli
from vcas_bench.config import SAMPLER_RULES
from vcas_bench.errors import UsageError
from vcas_bench.samplers import SAMPLERS
from vcas_bench.train import build
from vcas_bench.train.run import run
from vcas_bench.train.state import checkpoint_path, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "baselines=[]",
    "task.args.train_size=128",
    "task.args.eval_size=32",
    "task.batch_size=16",
    "trainer.num_threads=1",
    "trainer.progress=false",
    "trainer.device=cpu",
]
DIGITS = ["task=digits", "model=vit-tiny"]

# (overrides, the key the one line must name). Task and model are digits and vit-tiny unless given.
BAD_INPUTS = [
    # Ranges and types of the trainer, task and optimizer settings.
    (["model.optim.max_grad_norm=-1"], "model.optim.max_grad_norm"),  # used to flip the gradient
    (["trainer.num_threads=-1"], "trainer.num_threads"),
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["trainer.progress=maybe"], "trainer.progress"),
    (["trainer.accumulate=0"], "trainer.accumulate"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints"),
    (["trainer.stop_after=2"], "trainer.stop_after"),  # a stop that would not be checkpointed
    (["trainer.stop_after=0", "trainer.checkpoint_every=1"], "trainer.stop_after"),
    (["trainer.resume=/no/such/run"], "trainer.resume"),
    (["trainer.resume_force=true"], "trainer.resume_force"),  # forcing nothing
    (["model.optim.lr=0"], "model.optim.lr"),
    (["model.optim.lr=inf"], "model.optim.lr"),
    (["model.optim.weight_decay=-0.1"], "model.optim.weight_decay"),
    (["model.optim.warmup_ratio=1"], "model.optim.warmup_ratio"),
    (["model.optim.name=lion"], "model.optim.name"),
    (["task.epochs=0"], "task.epochs"),
    (["task.batch_size=0"], "task.batch_size"),
    (["task.batch_size=1.5"], "task.batch_size"),
    (["task.eval_batch_size=0"], "task.eval_batch_size"),
    (["task.num_labels=0"], "task.num_labels"),
    (["task.vcas_F=0"], "task.vcas_F"),
    (["seed=-1"], "seed"),
    (["logger=mlflow"], "logger"),
    (["baselines=exact"], "baselines"),
    (["baselines=[exact,nope]"], "nope"),
    # Names that do not exist, also when added with `+`.
    (["+trainer.max_stepz=5"], "trainer.max_stepz"),
    (["trainer.max_stepz=5"], "trainer.max_stepz"),
    (["max_steps=5"], "max_steps"),
    (["+foo=1"], "foo"),
    (["task=nope"], "task"),
    (["sampler.nope=1"], "nope"),
    # Builder arguments: counts, paths that must exist.
    (["task.args.train_size=0"], "task.args.train_size"),
    (["task.args.train_size=abc"], "task.args.train_size"),
    (["model.args.image_size=0"], "model.args.image_size"),
    (["task=mnist5k", "task.args.data_dir=/no/such/dir"], "task.args.data_dir"),
    (["task=rt-polarity", "model=minilm", "model.args.path=/no/such/dir"], "model.args.path"),
    # Every sampler's settings, including what null and 0 mean.
    (["sampler=vcas", "sampler.F=0"], "sampler.F"),  # used to mean "the default" silently
    (["sampler=vcas", "sampler.F=-5"], "sampler.F"),
    (["sampler=vcas", "sampler.F=2.5"], "sampler.F"),
    (["sampler=vcas", "sampler.M=2.5"], "sampler.M"),
    (["sampler=vcas", "sampler.M=1"], "sampler.M"),
    (["sampler=vcas", "sampler.tau=abc"], "sampler.tau"),
    (["sampler=vcas", "sampler.alpha=0"], "sampler.alpha"),
    (["sampler=vcas", "sampler.beta=1"], "sampler.beta"),
    (["sampler=vcas", "sampler.variance_subset=cols"], "sampler.variance_subset"),
    (["sampler=vcas-plus", "sampler.reuse_forward=maybe"], "sampler.reuse_forward"),
    (["sampler=vcas-plus", "sampler.alpha_max=0.001"], "sampler.alpha_max"),
    (["sampler=vcas-plus", "sampler.beta_min=0.99"], "sampler.beta_min"),
    (["sampler=vcas-plus", "sampler.F_max_factor=0"], "sampler.F_max_factor"),
    (["sampler=sb", "sampler.beta=-2"], "sampler.beta"),
    (["sampler=sb", "sampler.fixed_ratio=1.5"], "sampler.fixed_ratio"),
    (["sampler=ub", "sampler.ratio=0"], "sampler.ratio"),
    (["sampler=ub", "sampler.tau_th=abc"], "sampler.tau_th"),
    # The machine: a device it lacks, an output directory it cannot write.
    (["output_dir={file}/out"], "output_dir"),
    pytest.param(
        ["trainer.device=cuda"],
        "trainer.device",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
    ),
    # Found once the data has loaded, still before training.
    (["task.batch_size=200"], "task.batch_size"),  # 128 training rows; used to end in a bare StopIteration
    (["task.num_labels=3"], "task.num_labels"),
]


def _ids(case) -> str:
    args = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(args)


def _main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> tuple[int, list[str]]:
    """``vcas-bench <args>`` in this process: (exit status, stderr lines)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["vcas-bench", *args, f"hydra.run.dir={tmp_path / 'hydra'}"])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err.strip().splitlines()


def _trained(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name in ("metrics.json", "train_log.csv") or p.suffix == ".pt"]


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUTS, ids=[_ids(c) for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_before_training(overrides, key, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a directory")
    overrides = [o.format(file=tmp_path / "file") for o in overrides]
    given = {o.partition("=")[0] for o in overrides}
    out = tmp_path / "out"
    args = [
        *(a for a in DIGITS if a.partition("=")[0] not in given),
        *SMALL,
        "trainer.max_steps=2",
        *([] if "sampler" in given else ["sampler=exact"]),
        f"output_dir={out}",
        *overrides,
    ]
    code, lines = _main(args, monkeypatch, capsys, tmp_path)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("vcas-bench: error: "), lines
    assert key in lines[0] and "Traceback" not in lines[0], lines
    assert not out.exists() or not _trained(out)


def test_every_sampler_setting_has_a_rule():
    """A new sampler setting must say what it accepts, or its bad values would reach training."""
    for name in SAMPLERS.names():
        settings = SAMPLERS.get(name).Settings
        assert set(SAMPLER_RULES[name]) == set(settings.__dataclass_fields__), name


@pytest.mark.parametrize("steps", [1, 2])
def test_a_run_shorter_than_the_warm_up_still_compares(steps, tmp_path, monkeypatch, capsys):
    """1 or 2 steps are all warm-up (untimed): no time reduction in the comparison, no ZeroDivisionError."""
    out = tmp_path / "out"
    args = [
        *DIGITS,
        *SMALL,
        "sampler=sb",
        "baselines=[exact]",
        f"trainer.max_steps={steps}",
        f"output_dir={out}",
    ]
    code, lines = _main(args, monkeypatch, capsys, tmp_path)
    assert code == 0, lines
    metrics = json.loads((out / "sb" / "metrics.json").read_text())
    assert metrics["steps"] == steps and "time_reduction" not in metrics
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_resume_with_changed_settings_is_refused_unless_forced(make_cfg, tmp_path, monkeypatch, capsys):
    """A checkpoint written with tau=0.025 and seed 0 does not silently continue with other values: the CLI
    refuses in one line listing the differences (exit 2); ``trainer.resume_force=true`` continues and
    says so in metrics.json. A checkpoint of another sampler is refused the same way."""
    out = tmp_path / "out"
    common = [*DIGITS, *SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    overrides = [*common, "sampler=vcas", "sampler.F=2", f"output_dir={out}"]
    run(make_cfg(*overrides, "trainer.stop_after=2"), out)
    changed = [*overrides, "trainer.resume=auto", "sampler.tau=0.5", "seed=1"]
    code, lines = _main(changed, monkeypatch, capsys, tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert "sampler.tau: 0.025 -> 0.5" in lines[0] and "seed: 0 -> 1" in lines[0]
    assert "trainer.resume_force=true" in lines[0]
    assert not (out / "vcas" / "metrics.json").exists()
    (forced,) = run(make_cfg(*changed, "trainer.resume_force=true"), out)
    assert forced["resume_force"] is True and forced["resumed_from_step"] == 2
    assert "sampler.tau: 0.025 -> 0.5" in forced["resume_differences"]
    checkpoint = checkpoint_path(out / "vcas", 2)
    with pytest.raises(UsageError, match="a checkpoint of sampler 'vcas', but this command runs sb"):
        run(
            make_cfg(*common, "sampler=sb", f"trainer.resume={checkpoint}", f"output_dir={tmp_path / 'b'}"),
            tmp_path / "b",
        )
    with pytest.raises(UsageError, match=r"no run of exact to resume \(it holds vcas\)"):
        run(
            make_cfg(*common, "sampler=exact", f"trainer.resume={out}", f"output_dir={tmp_path / 'c'}"),
            tmp_path / "c",
        )


def _signal_at_forward(monkeypatch: pytest.MonkeyPatch, call: int, signum: int) -> None:
    """Send ``signum`` to this process during the ``call``-th training forward."""
    make_loss_fn, calls = build.build_loss_fn, []

    def signalling(*args):
        loss_fn = make_loss_fn(*args)

        def fn(batch):
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signum)
            return loss_fn(batch)

        return fn

    monkeypatch.setattr(build, "build_loss_fn", signalling)


def test_sigterm_checkpoints_at_the_step_boundary_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """SIGTERM during step 2 (of 6, checkpoints every 4): step 2 ends, is checkpointed, one line says where
    and how to resume, exit 143, status.json says interrupted; the resume continues from step 2."""
    out = tmp_path / "out"
    args = [
        *DIGITS,
        *SMALL,
        "sampler=exact",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=4",
        f"output_dir={out}",
    ]
    _signal_at_forward(monkeypatch, 2, signal.SIGTERM)
    code, lines = _main(args, monkeypatch, capsys, tmp_path)
    assert code == 143 and len(lines) == 1, lines
    checkpoint = checkpoint_path(out / "exact", 2)
    assert lines[0] == (
        f"vcas-bench: interrupted by SIGTERM at step 2/6 of exact; checkpoint {checkpoint}; "
        f"resume with output_dir={out} trainer.resume=auto"
    )
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert status["step"] == 2 and status["last_checkpoint"] == str(checkpoint) and checkpoint.exists()
    assert not (out / "exact" / "metrics.json").exists()
    monkeypatch.undo()
    code, lines = _main([*args, "trainer.resume=auto"], monkeypatch, capsys, tmp_path)
    metrics = json.loads((out / "exact" / "metrics.json").read_text())
    assert code == 0 and metrics["resumed_from_step"] == 2 and metrics["steps"] == 6


def test_nan_stop_is_one_line_and_marks_the_output_diverged(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    make_loss_fn = build.build_loss_fn

    def nan_loss(*args):
        loss_fn = make_loss_fn(*args)
        return lambda batch: (lambda losses, logits: (losses * math.nan, logits))(*loss_fn(batch))

    monkeypatch.setattr(build, "build_loss_fn", nan_loss)
    code, lines = _main(
        [*DIGITS, *SMALL, "sampler=exact", "trainer.max_steps=3", f"output_dir={out}"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 1 and lines == [
        "vcas-bench: diverged: exact: loss is nan at step 1; stopped before the "
        "update; no checkpoint was written"
    ], lines
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] == 1 and status["last_checkpoint"] is None


def test_sigint_and_a_second_writer(tmp_path, monkeypatch, capsys):
    """A real process trains; a second command on its output_dir is refused in one line naming the first
    one's PID (exit 2). SIGINT after the first step: the first process checkpoints at the step boundary,
    prints one line, exits 130 and leaves status.json saying interrupted."""
    out = tmp_path / "out"
    args = [
        *DIGITS,
        *SMALL,
        "sampler=exact",
        "trainer.max_steps=400",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=1",
        f"output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vcas_bench", *args, f"hydra.run.dir={tmp_path / 'first'}"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "exact" / "checkpoints").glob("step_*.pt")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        code, lines = _main(args, monkeypatch, capsys, tmp_path)
        assert code == 2 and lines == [
            f"vcas-bench: error: output_dir={out}: another vcas-bench process (pid {process.pid}) is writing "
            "there; wait for it to end or choose another output_dir"
        ], lines
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1, lines
    assert (
        lines[0].startswith("vcas-bench: interrupted by SIGINT at step ")
        and "trainer.resume=auto" in lines[0]
    )
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["pid"] == process.pid
    assert 1 <= status["step"] < 400 and Path(status["last_checkpoint"]) == checkpoint_path(
        out / "exact", status["step"]
    )
    assert load_checkpoint(Path(status["last_checkpoint"]))["step"] == status["step"]
    assert not (out / "exact" / "metrics.json").exists()


def test_a_model_path_may_name_a_weights_file(tmp_path):
    """timm loads a single ``model.safetensors``: ``model.args.path`` accepts a file as well as a folder."""
    from vcas_bench.rules import directory, existing_path

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert existing_path().problem("model.args.path", str(weights)) is None
    assert existing_path().problem("model.args.path", str(tmp_path)) is None
    assert "existing file or directory" in existing_path().problem("model.args.path", str(tmp_path / "no"))
    assert directory().problem("task.args.data_dir", str(weights)) is not None
