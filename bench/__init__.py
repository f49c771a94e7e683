"""Benchmarks: speed and memory of generation on this machine (see README, "Benchmark")."""
