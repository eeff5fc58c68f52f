"""Performance scripts: `python -m benchmarks.NAME` from the repository root (numbers in the README)."""
