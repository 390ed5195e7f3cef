"""Facts about every released I2E config, the embedded demo data and CIFAR10-DVS.

Numbers come from the I2E dataset card (UESTC-BICS/I2E) and the paper. ``splits`` lists the
splits that ship on the hub with their sample counts; a config without "validation" gets a
deterministic, seeded, stratified split made by the DataModule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from i2e_train.naming import unknown_name

__all__ = ["DatasetInfo", "CATALOG", "HUB_REPO", "get_info", "list_datasets", "check_facts"]

HUB_REPO = "UESTC-BICS/I2E"


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # config name on the hub (or our own name for non-released sets)
    source: str  # the static-image (or DVS) dataset it comes from
    resolution: tuple[int, int]  # (H, W)
    num_classes: int
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    ratio: float | None = None  # converter threshold ratio (None for real DVS data)
    order: int | None = 4  # converter order preset
    event_rate: float | None = None  # mean fraction of ON+OFF events, as published
    timesteps: int = 8
    channels: int = 2
    kind: str = "i2e"  # "i2e" (released/converted parquet), "embedded" (built locally), "dvs"
    hub_repo: str | None = HUB_REPO

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Event tensor shape of one sample, (T, C, H, W)."""
        return (self.timesteps, self.channels, *self.resolution)

    @property
    def has_validation(self) -> bool:
        return "validation" in self.splits


def _i2e(name, source, res, classes, splits, ratio, rate) -> DatasetInfo:
    return DatasetInfo(
        name=name, source=source, resolution=(res, res), num_classes=classes,
        splits=splits, ratio=ratio, event_rate=rate,
    )


CATALOG: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _i2e("I2E-CIFAR10", "CIFAR-10", 128, 10, {"train": 50_000, "validation": 10_000}, 0.07, 0.0586),
        _i2e("I2E-CIFAR100", "CIFAR-100", 128, 100, {"train": 50_000, "validation": 10_000}, 0.07, 0.0576),
        _i2e("I2E-ImageNet", "ILSVRC2012", 224, 1000, {"train": 1_281_167, "validation": 50_000}, 0.12, 0.0666),
        _i2e("I2E-Caltech101", "Caltech-101", 224, 101, {"train": 8_677}, 0.12, 0.0625),
        _i2e("I2E-Caltech256", "Caltech-256", 224, 257, {"train": 30_607}, 0.12, 0.0604),
        _i2e("I2E-Mini-ImageNet", "Mini-ImageNet", 224, 100, {"train": 60_000}, 0.12, 0.0665),
        _i2e("I2E-MNIST", "MNIST", 32, 10, {"train": 60_000, "validation": 10_000}, 0.10, 0.0956),
        _i2e("I2E-FashionMNIST", "Fashion-MNIST", 32, 10, {"train": 60_000, "validation": 10_000}, 0.15, 0.1076),
        DatasetInfo(
            name="I2E-Digits", source="scikit-learn digits (8x8, 1,797 images)", resolution=(32, 32),
            num_classes=10, splits={"train": 1_437, "validation": 360}, ratio=0.10,
            kind="embedded", hub_repo=None,
        ),
        DatasetInfo(
            name="CIFAR10-DVS", source="DVS128 recordings of CIFAR-10 (SpikingJelly frames)",
            resolution=(128, 128), num_classes=10, splits={"train": 9_000, "validation": 1_000},
            ratio=None, order=None, kind="dvs", hub_repo=None,
        ),
    )
}


def list_datasets(kind: str | None = None) -> list[str]:
    return [n for n, i in CATALOG.items() if kind is None or i.kind == kind]


def get_info(name: str) -> DatasetInfo:
    """Catalog entry by config name; unknown names get the list and the closest match."""
    try:
        return CATALOG[name]
    except KeyError:
        raise unknown_name("dataset config", name, CATALOG, error=KeyError) from None


def check_facts(info: DatasetInfo, num_classes: int | None = None, resolution: tuple[int, int] | None = None,
                timesteps: int | None = None) -> DatasetInfo:
    """``info`` when the facts a data config states agree with it (None = not stated), else ValueError."""
    given = {"num_classes": num_classes, "resolution": resolution, "timesteps": timesteps}
    for key, value in given.items():
        if value is not None and value != getattr(info, key):
            raise ValueError(f"data config for {info.name}: {key}={value!r} but the catalog says {getattr(info, key)!r}")
    return info
