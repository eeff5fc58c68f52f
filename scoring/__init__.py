"""Scores over a recaption output, each an extra stage committed through the output contract (dataset/outputs.py)."""
