"""i2e-train: train spiking neural networks on I2E event data (Ma et al., AAAI 2026)."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> Path:
    """The Hydra config folder: inside the installed wheel, else the repository's top level."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parent.parent / "configs"
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"i2e-train configs not found (looked in {packaged} and {repo})")


from i2e_train.config import register_resolvers  # noqa: E402 - needs config_dir above

register_resolvers()
