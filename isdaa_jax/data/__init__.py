"""Preference-pair sources, tokenization and the Grain input pipeline."""
