"""`i2e-pipeline`: run a multi-stage recipe, e.g. `i2e-pipeline pipeline=sim2real`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.pipeline import run_pipeline


def _compose(config_name: str, overrides) -> DictConfig:
    return hydra.compose(config_name=config_name, overrides=list(overrides))


@entry_point("pipeline")
def main(cfg: DictConfig) -> None:
    manifest = run_pipeline(cfg, _compose)
    for name, rec in manifest["stages"].items():
        state = "skipped (done earlier)" if rec.get("skipped") else "done"
        print(f"{name}: {state}; best checkpoint {rec.get('best_checkpoint')}; init from {rec.get('init_from')}")


if __name__ == "__main__":
    main()
