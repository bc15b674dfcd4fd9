"""Write results/tables/: the paper's Tables 1–7 beside our proxy runs, figures, and an index.

    python scripts/make_tables.py [--results results] [--out results/tables] [--paper results/paper]

The work is done by ``vcas_bench.report.tables.make_tables``; this only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vcas_bench.report.tables import make_tables


def main(argv: list[str] | None = None) -> None:
    """Parse the folders, build every table and figure, print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="folder searched for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results>/tables)")
    parser.add_argument("--paper", type=Path, default=None, help="paper CSVs (default: <results>/paper)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in make_tables(args.results, args.out or args.results / "tables", args.paper):
        print(path)


if __name__ == "__main__":
    main()
