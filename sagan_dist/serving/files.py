"""The two data files of a logged generator: weights (weights-only torch file) and config (JSON)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sagan_dist import fsio

WEIGHTS_FILE = "generator.pt"  # the EMA generator's state dict, loaded with weights_only=True
CONFIG_FILE = "generator.json"  # the run's config (tracking.uri redacted): builds the generator


def config_hash(container: dict[str, Any]) -> str:
    """A short, stable digest of a config: equal hashes, equal configs."""
    return hashlib.sha256(json.dumps(container, sort_keys=True).encode()).hexdigest()[:16]


def write_model_files(directory: Path, generator: torch.nn.Module, container: dict[str, Any]) -> dict[str, Path]:
    """Write the generator's weights and config into ``directory``; returns {"weights", "config"}."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    weights = fsio.save_torch(state, directory / WEIGHTS_FILE)
    config = fsio.atomic_write(directory / CONFIG_FILE, json.dumps(container, indent=1, sort_keys=True))
    return {"weights": weights, "config": config}


def load_model_files(weights: Path, config: Path, device: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """The generator (eval mode) and its config from the two files; nothing in them can run code
    (a pickle in place of the weights is refused, naming the file)."""
    from sagan_dist.config import ConfigError, from_container
    from sagan_dist.models.sagan import build_models

    try:
        container = json.loads(Path(config).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: not a readable generator config ({e})") from None
    if not isinstance(container, dict):
        raise ConfigError(f"{config}: a generator config must be a JSON object")
    cfg = from_container(container, world_size=1)
    g, _ = build_models(cfg)
    g.load_state_dict(fsio.load_torch(weights))
    return g.to(device).eval(), cfg
