"""``i2e-convert``: static images -> I2E parquet; configs/convert.yaml lists the arguments of
[`i2e_train.convert.convert`][i2e_train.convert.convert], which this calls."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.config import call_target
from i2e_train.files import atomic_write_json


@entry_point("convert")
def main(cfg: DictConfig) -> None:
    summary = call_target(cfg)
    print(summary.format(), flush=True)
    atomic_write_json(Path(cfg.paths.output_dir) / "convert_summary.json", summary.to_dict(), indent=1)


if __name__ == "__main__":
    main()
