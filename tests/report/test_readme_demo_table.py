"""The README's demo table is the committed run's, not retyped: its lines are those of
``results/proxy/vcas-plus-demo/comparison.md`` (a fact stated twice drifts)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_demo_rows_are_the_committed_runs():
    committed = (ROOT / "results/proxy/vcas-plus-demo/comparison.md").read_text().splitlines()
    readme = (ROOT / "README.md").read_text().split("```")[3].strip().splitlines()  # the block after "prints"
    assert readme[0].startswith("| sampler") and len(readme) == 4, readme
    assert all(line in committed for line in readme), readme
