"""The ``vcas-bench`` console script: the runner (:mod:`vcas_bench.cli`) when its stack is installed,
else one line saying what to install. ``pip install vcas-bench`` is the method alone (torch only)."""

from __future__ import annotations

import importlib.util
import sys

# Top-level modules of the `bench` extra in pyproject.toml that the runner imports.
RUNNER_STACK = (
    "hydra",
    "omegaconf",
    "transformers",
    "datasets",
    "timm",
    "torchvision",
    "numpy",
    "pandas",
    "tabulate",
    "tqdm",
    "matplotlib",
    "sklearn",
    "mlxtend",
)


def missing_runner_modules() -> list[str]:
    return [name for name in RUNNER_STACK if importlib.util.find_spec(name) is None]


def main() -> None:
    missing = missing_runner_modules()
    if missing:
        print(
            f"vcas-bench: the benchmark runner is not installed ({', '.join(missing)} missing); "
            f'pip install "vcas-bench[bench]"',
            file=sys.stderr,
        )
        sys.exit(2)
    from vcas_bench.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
