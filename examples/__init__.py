"""Worked examples: your own model, named in a config as ``examples.my_model:build``."""
