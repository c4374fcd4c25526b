"""Benchmarks of the DDF and metric code; run the scripts from the repository root (see each docstring)."""
