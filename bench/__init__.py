"""Benchmarks: bench/run.py (scripts/bench), the floor server, the tasks they load."""
