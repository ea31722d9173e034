"""Benchmark harness: the fleet against its baselines, side by side, written to BENCHMARKS.md.
``python -m bench``; ``--quick`` for a smoke run. Nothing here asserts a timing."""
