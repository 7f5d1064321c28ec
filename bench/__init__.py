"""Benchmarks on real audio (``make bench``); never part of the test suite."""

from pathlib import Path

#: The clone the benchmarks run in (they start the product's processes there and write results).
REPO_ROOT = Path(__file__).resolve().parent.parent
