"""The performance bench: `bench/run` (see bench/main.py)."""
