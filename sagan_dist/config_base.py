"""What the config schema (config.py) and its value checks (config_checks.py) both need.

It sits below both so that imports run one way: config -> config_checks -> config_base.
Other code keeps importing these names from sagan_dist.config, which re-exports them.
"""
from __future__ import annotations

RESOLUTIONS = (32, 64, 128, 256, 512)
# Feature-map resolutions of the self-attention blocks when model.g_attention / d_attention is null:
# the paper's placement at 128 px (models/sagan.py builds from this table; the checks bound by it).
DEFAULT_ATTENTION = {32: [16], 64: [32], 128: [32], 256: [64], 512: [64]}


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


def feature_resolutions(resolution: int) -> list[int]:
    """Feature-map resolutions a model of this size has (4 .. resolution)."""
    return [2**i for i in range(2, resolution.bit_length())]
