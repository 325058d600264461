"""Experiment YAMLs and the `leanvit` command (cli.py)."""
