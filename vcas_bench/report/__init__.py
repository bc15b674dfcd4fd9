"""Reporting: per-run files written atomically, and the comparison table."""
