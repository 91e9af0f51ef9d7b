"""Experiment configs (ml_collections). Each file's docstring says how to run it."""
