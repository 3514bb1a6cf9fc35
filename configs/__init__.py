"""Experiment configs: `get_config()` returning an ml_collections.ConfigDict."""
