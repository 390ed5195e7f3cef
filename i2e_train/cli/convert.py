"""``i2e-convert``: static images -> I2E parquet (see configs/convert.yaml and i2e_train.convert)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from i2e_train.cli._hydra import entry_point
from i2e_train.files import atomic_write_json

log = logging.getLogger(__name__)

_ARGS = (
    "source_type", "hf_config", "image_column", "label_column", "cache_dir", "batch_size", "num_workers",
    "rows_per_shard", "device", "train_mode", "seed", "padding_mode", "on_bad_image", "overwrite", "limit",
    "max_shards", "progress",
)


def run(cfg: DictConfig):
    """Call ``i2e_train.convert.convert`` with the composed config; returns the summary."""
    from i2e_train.convert import convert

    c = _plain(cfg, ("source", "out", "config", "splits", "resolution", "ratio", "order", *_ARGS))
    summary = convert(
        c["source"], c["out"], c["config"], splits=c.get("splits"), resolution=c.get("resolution"),
        ratio=c.get("ratio"), order=c.get("order"), **{k: c[k] for k in _ARGS if k in c},
    )
    print(summary.format(), flush=True)
    try:  # keep the summary beside the Hydra run log
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        atomic_write_json(run_dir / "convert_summary.json", summary.to_dict(), indent=1)
    except Exception:  # noqa: BLE001 - not inside a Hydra run (tests, notebooks)
        pass
    return summary


def _plain(cfg: DictConfig, keys) -> dict:
    """The named keys as plain Python values (other keys, e.g. paths.output_dir, stay unresolved)."""
    out = {}
    for k in keys:
        if k in cfg:
            v = cfg[k]
            out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out


@entry_point("convert")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
