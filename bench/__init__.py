"""Benchmarks on real audio (``make bench``); never part of the test suite."""
