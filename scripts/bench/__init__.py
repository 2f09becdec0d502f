"""The benchmark's figures, one module each, on one shared harness; run them all with
``python scripts/benchmark.py``."""
