"""Thin Hydra entry points: parse the config, instantiate, call."""
