"""Shared test set-up: offline, a throw-away HF cache, wandb off, configs composed like the CLI does."""

from __future__ import annotations

import os
import tempfile

# Before anything imports transformers/datasets: nothing may reach the network or the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="vcas-bench-hf-")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vcas_bench.cli import CONF_DIR  # noqa: E402

# One thread per pytest-xdist worker (``make test`` runs two on two cores), two when run alone.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

FAST = ["trainer.progress=false", "trainer.device=cpu"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from this run instead of comparing with them")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """``--update-golden`` was given: golden tests write their files (and then skip) instead of comparing."""
    return request.config.getoption("--update-golden")


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``vcas-bench *args`` through the real entry point in this process; a non-zero exit fails the test
    with the one line the CLI printed."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from vcas_bench import cli

    monkeypatch.setattr(sys, "argv", ["vcas-bench", *args])
    try:
        cli.main()
    except SystemExit as stop:
        pytest.fail(f"exit {stop.code}: {capsys.readouterr().err.strip()}")
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The config the CLI would build for ``overrides`` (with Hydra's own node when ``hydra``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)`` -> a fast CPU config writing into ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return compose_config([*FAST, f"output_dir={tmp_path}", *overrides])

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead (and contend on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """Tiny local copies, in the real formats, of every checkpoint and dataset the paper's commands use."""
    from standins import write_standins

    return write_standins(tmp_path_factory.mktemp("standins"))
