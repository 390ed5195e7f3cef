"""Facts about every released I2E config, the embedded demo data and the real event recordings.

Numbers come from the I2E dataset card (UESTC-BICS/I2E) and the paper. ``splits`` lists the
splits that ship on the hub with their sample counts; a config without "validation" gets a
deterministic, seeded, stratified split made by the DataModule.

Real recordings (kind "dvs": CIFAR10-DVS from a DVS128, N-MNIST and N-Caltech101 from an ATIS)
name their ``twin``: the released I2E config converted from the same source images. Their
``resolution`` is the twin's (frames are brought to it) and their class indices are the twin's,
matched by class name through ``class_names`` (label index -> class name).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from i2e_train.naming import unknown_name

__all__ = ["DatasetInfo", "CATALOG", "HUB_REPO", "get_info", "list_datasets", "check_facts", "MNIST_CLASSES",
           "CIFAR10_CLASSES", "CALTECH101_CLASSES"]

HUB_REPO = "UESTC-BICS/I2E"

# Label index -> class name of the released configs that have a real twin. The released labels
# are the source dataset's class indices as read by torchvision (the official conversion
# notebooks, e.g. "Dataset Transformation/CIFAR10.ipynb" of github.com/Ruichen0424/I2E, read
# their sources with torchvision.datasets and name each record's folder str(target)).
MNIST_CLASSES = tuple(str(d) for d in range(10))  # torchvision MNIST: target = the digit
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# torchvision.datasets.Caltech101: sorted(os.listdir("101_ObjectCategories")) without
# "BACKGROUND_Google" (8,677 images, the sample count of I2E-Caltech101). Python's sort puts the
# four capitalised folders first. That I2E-Caltech101 follows this order is inferred (the authors
# publish no Caltech conversion script and the labels are indices): for a copy made from another
# order, pass that order to the N-Caltech101 DataModule (data.twin_classes=[...]).
CALTECH101_CLASSES = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant", "barrel", "bass",
    "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car_side",
    "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face", "crab", "crayfish", "crocodile",
    "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar", "elephant", "emu",
    "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano",
    "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch",
    "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret",
    "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino",
    "rooster", "saxophone", "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler",
    "starfish", "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)


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
    kind: str = "i2e"  # "i2e" (released/converted parquet), "embedded" (built locally), "dvs" (real recordings)
    hub_repo: str | None = HUB_REPO
    class_names: tuple[str, ...] = ()  # label index -> class name, where known
    twin: str | None = None  # real recordings: the I2E config converted from the same source images
    # How the source images were resized before conversion (i2e_train.data.preprocess): "bilinear"
    # where the official notebooks made the data (v2.Resize default: CIFAR-10/100, ImageNet),
    # else the dataset card's protocol, "bicubic" (v2.Resize BICUBIC on the uint8 tensor).
    interpolation: str = "bicubic"
    # Validation images: shorter side resized to this, then a centre crop to the resolution
    # (the ImageNet notebook's Resize(256) + CenterCrop(224)); None = resized straight.
    val_resize: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Event tensor shape of one sample, (T, C, H, W)."""
        return (self.timesteps, self.channels, *self.resolution)

    @property
    def has_validation(self) -> bool:
        return "validation" in self.splits


def _i2e(name, source, res, classes, splits, ratio, rate, names=(), interpolation="bicubic") -> DatasetInfo:
    return DatasetInfo(
        name=name, source=source, resolution=(res, res), num_classes=classes,
        splits=splits, ratio=ratio, event_rate=rate, class_names=tuple(names), interpolation=interpolation,
    )


def _recorded(name, source, twin: DatasetInfo, splits) -> DatasetInfo:
    """Real recordings served at their twin's resolution with their twin's classes."""
    return DatasetInfo(
        name=name, source=source, resolution=twin.resolution, num_classes=twin.num_classes, splits=splits,
        ratio=None, order=None, kind="dvs", hub_repo=None, class_names=twin.class_names, twin=twin.name,
    )


_MNIST = _i2e("I2E-MNIST", "MNIST", 32, 10, {"train": 60_000, "validation": 10_000}, 0.10, 0.0956, MNIST_CLASSES)
_CIFAR10 = _i2e("I2E-CIFAR10", "CIFAR-10", 128, 10, {"train": 50_000, "validation": 10_000}, 0.07, 0.0586,
                CIFAR10_CLASSES, interpolation="bilinear")
_CALTECH101 = _i2e("I2E-Caltech101", "Caltech-101", 224, 101, {"train": 8_677}, 0.12, 0.0625, CALTECH101_CLASSES)


CATALOG: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _CIFAR10,
        _i2e("I2E-CIFAR100", "CIFAR-100", 128, 100, {"train": 50_000, "validation": 10_000}, 0.07, 0.0576,
             interpolation="bilinear"),
        replace(_i2e("I2E-ImageNet", "ILSVRC2012", 224, 1000, {"train": 1_281_167, "validation": 50_000}, 0.12,
                     0.0666, interpolation="bilinear"), val_resize=256),
        _CALTECH101,
        _i2e("I2E-Caltech256", "Caltech-256", 224, 257, {"train": 30_607}, 0.12, 0.0604),
        _i2e("I2E-Mini-ImageNet", "Mini-ImageNet", 224, 100, {"train": 60_000}, 0.12, 0.0665),
        _MNIST,
        _i2e("I2E-FashionMNIST", "Fashion-MNIST", 32, 10, {"train": 60_000, "validation": 10_000}, 0.15, 0.1076),
        DatasetInfo(
            name="I2E-Digits", source="scikit-learn digits (8x8, 1,797 images)", resolution=(32, 32),
            num_classes=10, splits={"train": 1_437, "validation": 360}, ratio=0.10,
            kind="embedded", hub_repo=None,
        ),
        _recorded("CIFAR10-DVS", "DVS128 recordings of CIFAR-10 images (128x128)", _CIFAR10,
                  {"train": 9_000, "validation": 1_000}),
        # The official Train/Test folders (the MNIST split), 34x34 ATIS pixels.
        _recorded("N-MNIST", "ATIS recordings of MNIST digits (saccades, 34x34)", _MNIST,
                  {"train": 60_000, "validation": 10_000}),
        # 8,709 files: 100 object classes (Caltech-101 without "Faces") + 467 BACKGROUND_Google,
        # each as large as the image was shown (up to about 240x180); no official split.
        _recorded("N-Caltech101", "ATIS recordings of Caltech-101 images (saccades)", _CALTECH101,
                  {"train": 8_242}),
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
