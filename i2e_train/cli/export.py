"""``i2e-export``: a checkpoint as a NIR graph (or safetensors); see `i2e_train.tasks.export_nir`."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point


@entry_point("export")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from i2e_train.tasks.export_nir import export_from_overrides  # here: --help imports no torch

    export_from_overrides(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
