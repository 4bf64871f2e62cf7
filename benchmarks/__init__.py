"""Benchmarks and the scripts that build the model zoo."""
