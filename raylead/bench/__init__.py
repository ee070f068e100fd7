"""Benchmarks: each measures raylead against a baseline side by side in one run."""
