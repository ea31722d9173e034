"""Benchmark harness: the fleet against its baselines, side by side, written to BENCHMARKS.md.

Run ``python -m bench`` (or ``python bench/run.py``); ``--quick`` for a smoke run. Not part
of the test suite: nothing here asserts a timing.
"""
