"""`data=local data.path=<i2e-convert output>`: facts from the dataset card and the manifest, errors that
name the missing file or key, and a training run with no data override but the path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from helpers import run_cli
from i2e_train.config import compose
from i2e_train.convert import convert
from i2e_train.data.local import LocalDataError, local_facts, own_data

CLASSES = ("cat", "dog", "emu")


def image_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            img[:, : 4 + 4 * CLASSES.index(c)] = 255  # a class-dependent bright band
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """i2e-convert output of one config, MyPets: 3 classes, 16x16, ratio 0.1."""
    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "out"
    convert(image_folder(tmp / "images"), out, "MyPets", resolution=16, ratio=0.1, num_workers=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def _clear():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_facts_come_from_the_card_and_the_manifest(converted):
    facts = local_facts(converted)
    assert (facts.name, facts.num_classes, facts.resolution, facts.timesteps) == ("MyPets", 3, [16, 16], 8)
    assert facts.ratio == pytest.approx(0.1) and facts.class_names == list(CLASSES) and len(facts.order) == 8
    cfg = compose("train", ["data=local", f"data.path={converted}", "paths.output_dir=unused"])
    assert cfg.data.num_classes == cfg.model.num_classes == cfg.module.num_classes == 3
    assert list(cfg.data.resolution) == [16, 16] and cfg.data.timesteps == 8 and cfg.data.ratio == pytest.approx(0.1)
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    assert dm.info.name == "MyPets" and dm.shape == (8, 2, 16, 16) and dm.info.ratio == pytest.approx(0.1)
    assert dm.info.class_names == CLASSES
    dm.setup()  # no validation split: the seeded stratified one
    assert len(dm.datasets["train"]) + len(dm.datasets["validation"]) == 18 and len(dm.datasets["validation"]) == 3


def test_several_configs_need_a_name(converted, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(converted, out)
    convert(image_folder(tmp_path / "images2", per_class=2, seed=1), out, "Other", resolution=8, ratio=0.2,
            num_workers=0, progress=False)
    with pytest.raises(LocalDataError, match=r"several configs: MyPets, Other; pick one with data.name=<config>"):
        local_facts(out)
    assert local_facts(out, "Other").resolution == [8, 8]
    with pytest.raises(LocalDataError, match=r"has no config 'Nope'; its configs: MyPets, Other"):
        local_facts(out, "Nope")
    cfg = compose("train", ["data=local", f"data.path={out}", "data.name=Other", "paths.output_dir=unused"])
    assert cfg.model.num_classes == 3 and list(cfg.data.resolution) == [8, 8]
    with pytest.raises(Exception, match="several configs"):  # the resolver's error reaches the user
        compose("train", ["data=local", f"data.path={out}", "paths.output_dir=unused"]).model.num_classes


def test_missing_pieces_are_named(converted, tmp_path):
    import shutil

    with pytest.raises(LocalDataError, match="is not a folder"):
        local_facts(tmp_path / "nowhere")
    with pytest.raises(LocalDataError, match=r"README.md not found"):
        local_facts(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    manifest = out / "MyPets" / "convert-manifest.json"
    data = json.loads(manifest.read_text())
    del data["params"]["class_names"], data["params"]["ratio"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(LocalDataError, match=r"convert-manifest.json: params lack 'ratio', 'class_names'"):
        local_facts(out)
    manifest.unlink()
    with pytest.raises(LocalDataError, match=r"MyPets/convert-manifest.json not found"):
        local_facts(out)
    with pytest.raises(ValueError, match="data.num_classes=4 but .* says 3"):
        own_data(str(converted), num_classes=4)


def test_a_checkpoint_of_another_class_count_names_the_data_folder(converted, tmp_path):
    """data=local has no dataset name in its config: the error names data.path (not 'None')."""
    from test_security import _checkpoint, _stored_config

    from i2e_train.tasks.evaluate import checkpoint_config
    from i2e_train.tasks.train import train

    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", _stored_config(tmp_path))  # 10 classes
    overrides = [f"ckpt_path={ckpt}", "data=local", f"data.path={converted}", f"paths.output_dir={tmp_path / 'new'}"]
    with pytest.raises(ValueError, match=rf"this run's data data\.path={re.escape(str(converted))} has 3;"):
        train(compose("train", overrides))
    with pytest.raises(ValueError, match=rf"the data evaluated here \(data\.path={re.escape(str(converted))}\) 3;"):
        checkpoint_config(compose("eval", overrides), overrides)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_train_on_own_data_with_only_its_path(converted, tmp_path):
    """`i2e-train data=local data.path=<out>` plus CPU / speed settings only."""
    run_cli("i2e_train.cli.train", "data=local", f"data.path={converted}", "trainer.max_epochs=1",
            "data.num_workers=0", "~logger", "trainer.accelerator=cpu", cwd=tmp_path, timeout=900)
    (metrics,) = (tmp_path / "logs" / "train" / "runs").rglob("metrics.json")
    result = json.loads(metrics.read_text())
    assert "val/top1" in result["best"]
    card = json.loads((metrics.parent / "model_card.json").read_text())
    assert card["num_classes"] == 3 and card["resolution"] == [16, 16] and card["data_config"]["path"] == str(converted)
    facts = local_facts(converted)
    assert card["converter_ratio"] == facts.ratio and card["converter_order"] == facts.order
