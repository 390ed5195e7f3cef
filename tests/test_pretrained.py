"""Checkpoint loading (official / Lightning / safetensors / raw), head replacement, the released
weights table and their resolution through a monkeypatched Hugging Face hub."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from i2e_train.i2e import I2E
from i2e_train.models import (
    RELEASED_WEIGHTS,
    CheckpointFormatError,
    CheckpointMismatchError,
    ReleasedWeightsUnavailable,
    create_model,
    export_safetensors,
    hub,
    load_checkpoint,
    replace_head,
    resolve_released,
)


@dataclasses.dataclass
class HParams:
    """A non-tensor object in a Lightning checkpoint (needs full unpickling)."""

    lr: float = 0.1


def trained_model(name: str = "ms_resnet18", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A model whose weights and BN buffers all differ from a fresh initialisation."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        for _ in range(2):  # move the running statistics
            model((torch.rand(2, 2, 2, 32, 32) < 0.3).float())
    return model.eval()


def converted_events(batch: int = 2, hw: int = 32) -> torch.Tensor:
    """Events from the I2E converter in eval mode: [8, B, 2, H, W] float."""
    g = torch.Generator().manual_seed(123)
    images = torch.rand(batch, 3, hw, hw, generator=g)
    with torch.no_grad():
        return I2E(ratio=0.07, order=4).eval()(images)


def official_checkpoint(model: torch.nn.Module, path: Path, best_acc1=12.3) -> Path:
    """The layout of the released *.pth.tar files (DataParallel keys + converter kernels)."""
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    sd["module.i2e.weight"] = torch.randn(8, 1, 3, 3)
    torch.save({"epoch": 5, "state_dict": sd, "best_acc1": best_acc1}, path)
    return path


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# official, Lightning, safetensors and raw formats
# ---------------------------------------------------------------------------------------------


def test_official_checkpoint_loads_strictly_and_reproduces_logits(tmp_path):
    src = trained_model()
    path = official_checkpoint(src, tmp_path / "x.pth.tar")
    dst = create_model("ms_resnet18", num_classes=10).eval()
    report = load_checkpoint(dst, path)

    assert report.format == "official" and report.source == str(path)
    assert report.epoch == 5 and report.best_acc1 == pytest.approx(12.3)
    assert report.ignored_keys == ["module.i2e.weight"]
    assert report.loaded_keys == 122 and not report.missing_keys and not report.unexpected_keys
    assert report.head_replaced is False
    assert_same_state(src, dst)

    x = converted_events()
    assert x.shape == (8, 2, 2, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


@pytest.mark.slow
def test_released_layout_gives_the_official_networks_logits(tmp_path):
    """The official network (``tests/official``: MSNet_I2E with its converter inside) saved in the
    released layout and loaded strictly into ours: our converter and network give its logits, to
    the bit, on real photographs."""
    from spikingjelly.activation_based import functional

    from official import MSNet_I2E

    torch.manual_seed(0)
    theirs = MSNet_I2E.resnet18(num_classes=10, ratio=0.07)
    functional.set_step_mode(theirs, "m")  # as the official scripts run it
    with torch.no_grad():  # weights and batch-norm statistics away from their initial values
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    theirs.eval()
    path = tmp_path / "cifar10_augmentation.pth.tar"
    state = {"module." + k: v for k, v in theirs.state_dict().items()}  # holds module.i2e.weight too
    torch.save({"epoch": 255, "state_dict": state, "best_acc1": 89.23}, path)

    ours = create_model("ms_resnet18", num_classes=10).eval()
    report = load_checkpoint(ours, path)
    assert report.ignored_keys == ["module.i2e.weight"] and report.loaded_keys == 122

    from sklearn.datasets import load_sample_image

    photos = torch.stack([torch.from_numpy(load_sample_image(n)[:64, 100:164]).permute(2, 0, 1)
                          for n in ("china.jpg", "flower.jpg")]).float() / 255  # [2, 3, 64, 64]
    with torch.no_grad():
        expected = theirs(photos)
        got = ours(I2E(ratio=0.07, order=4).eval()(photos))
    assert expected.shape == (2, 10) and expected.abs().sum() > 0
    assert torch.equal(got, expected)


def test_official_checkpoint_with_tensor_best_acc1(tmp_path):
    src = trained_model("ms_resnet_tiny")
    path = official_checkpoint(src, tmp_path / "y.pth.tar", best_acc1=torch.tensor(77.5))
    report = load_checkpoint(create_model("ms_resnet_tiny", num_classes=10), path)
    assert report.best_acc1 == pytest.approx(77.5)


def test_lightning_checkpoint(tmp_path):
    src = trained_model("ms_resnet_tiny")
    sd = {"model." + k: v for k, v in src.state_dict().items()}
    sd["criterion.weight"] = torch.ones(10)  # another part of the LightningModule
    path = tmp_path / "last.ckpt"
    ckpt = {"epoch": 3, "global_step": 42, "pytorch-lightning_version": "2.6.0", "state_dict": sd,
            "hyper_parameters": {"lr": 0.1}}
    torch.save(ckpt, path)
    dst = create_model("ms_resnet_tiny", num_classes=10)
    report = load_checkpoint(dst, path)
    assert report.format == "lightning" and report.epoch == 3
    assert report.ignored_keys == ["criterion.weight"]
    assert_same_state(src, dst)

    # a hyper-parameter that is an arbitrary object: refused for .ckpt files too (never unpickled)
    torch.save(dict(ckpt, hyper_parameters={"hp": HParams()}), path)
    with pytest.raises(CheckpointFormatError, match="refused.*HParams.*convert"):
        load_checkpoint(dst, path)


def test_safetensors_round_trip(tmp_path):
    src = trained_model("ms_resnet_tiny")
    path = tmp_path / "out" / "tiny.safetensors"
    written = export_safetensors(src, path, {"epoch": 7, "dataset": "I2E-CIFAR10", "cfg": {"lr": 0.1}})
    assert written == path and path.is_file() and not list(path.parent.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dataset"] == "I2E-CIFAR10" and meta["epoch"] == "7" and meta["cfg"] == '{"lr": 0.1}'
    assert meta["architecture"] == "ms_resnet_tiny" and meta["num_classes"] == "10"

    dst = create_model("ms_resnet_tiny", num_classes=10).eval()
    report = load_checkpoint(dst, path)
    assert report.format == "safetensors" and report.epoch == 7 and report.metadata["dataset"] == "I2E-CIFAR10"
    assert_same_state(src, dst)
    x = converted_events()
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_raw_state_dict_with_wrapper_prefixes(tmp_path):
    src = trained_model("ms_resnet_tiny")
    path = tmp_path / "raw.pth"
    torch.save({"module._orig_mod." + k: v for k, v in src.state_dict().items()}, path)
    dst = create_model("ms_resnet_tiny", num_classes=10)
    assert load_checkpoint(dst, path).format == "state_dict"
    assert_same_state(src, dst)

    fresh = create_model("ms_resnet_tiny", num_classes=10)
    report = load_checkpoint(fresh, src.state_dict())  # in memory
    assert report.source == "<in-memory state dict>"
    assert_same_state(src, fresh)


# ---------------------------------------------------------------------------------------------
# mismatches
# ---------------------------------------------------------------------------------------------


def test_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = {"module." + k: v.clone() for k, v in trained_model("ms_resnet18").state_dict().items()}
    del sd["module.layer1.0.conv1.weight"]
    sd["module.foo.bar"] = torch.zeros(3, 4)
    sd["module.layer2.0.bn1.weight"] = torch.ones(7)
    path = tmp_path / "broken.pth.tar"
    torch.save({"epoch": 1, "state_dict": sd, "best_acc1": 1.0}, path)

    dst = create_model("ms_resnet18", num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(dst, path)
    e, msg = err.value, str(err.value)
    assert isinstance(e, RuntimeError) and isinstance(e, ValueError)
    assert str(path) in msg
    assert "missing from the checkpoint (1)" in msg and "layer1.0.conv1.weight [64, 64, 3, 3]" in msg
    assert "unexpected in the checkpoint (1)" in msg and "foo.bar [3, 4]" in msg
    assert "layer2.0.bn1.weight: checkpoint [7] vs model [128]" in msg
    assert e.missing == ["layer1.0.conv1.weight"] and e.unexpected == ["foo.bar"]
    assert e.mismatched == [("layer2.0.bn1.weight", (7,), (128,))]
    # nothing was loaded
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k

    # strict=False loads what matches and reports the rest
    report = load_checkpoint(dst, path, strict=False)
    assert report.missing_keys == ["layer1.0.conv1.weight"] and report.unexpected_keys == ["foo.bar"]
    assert report.mismatched_keys == [("layer2.0.bn1.weight", (7,), (128,))]
    assert torch.equal(dst.layer4[1].conv2.weight, sd["module.layer4.1.conv2.weight"])


def test_other_architecture_fails_clearly(tmp_path):
    path = official_checkpoint(create_model("ms_resnet34", num_classes=10), tmp_path / "r34.pth.tar")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(create_model("ms_resnet18", num_classes=10), path)
    msg = str(err.value)
    assert "layer1.2.conv1.weight [64, 64, 3, 3]" in msg and "unexpected in the checkpoint" in msg
    assert "looks like: ms_resnet34, BasicBlock layers [3, 4, 6, 3]" in msg
    assert "model (ms_resnet18: BasicBlock layers [2, 2, 2, 2]" in msg
    assert "... and" in msg  # long lists are cut in the message, kept whole on the exception
    assert len(err.value.unexpected) > 25 and not err.value.missing and not err.value.mismatched
    assert "replace_head" not in msg


def test_other_class_count_fails_without_replace_head(tmp_path):
    path = official_checkpoint(trained_model("ms_resnet18", num_classes=100), tmp_path / "c100.pth.tar")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(create_model("ms_resnet18", num_classes=10), path)
    msg = str(err.value)
    assert "fc.weight: checkpoint [100, 512] vs model [10, 512]" in msg
    assert "fc.bias: checkpoint [100] vs model [10]" in msg
    assert "100 classes" in msg and "replace_head=True" in msg


@pytest.mark.parametrize("num_classes", [10, 7])
def test_replace_head_keeps_the_backbone(tmp_path, num_classes):
    src = trained_model("ms_resnet18", num_classes=10)
    path = official_checkpoint(src, tmp_path / "c10.pth.tar")
    dst = create_model("ms_resnet18", num_classes=num_classes)
    fc_before = dst.fc.weight.detach().clone()
    report = load_checkpoint(dst, path, replace_head=True)

    assert report.head_replaced and set(report.ignored_keys) == {"module.i2e.weight", "fc.weight", "fc.bias"}
    assert_same_state(src if num_classes == 10 else dst, dst, skip=("fc.",))
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert dst.fc.weight.shape == (num_classes, 512) and dst.fc.bias.shape == (num_classes,)
    assert not torch.equal(dst.fc.weight, fc_before)  # re-initialised
    if num_classes == 10:
        assert not torch.equal(dst.fc.weight, src.fc.weight)
    with torch.no_grad():
        assert dst.eval()(converted_events()).shape == (2, num_classes)


def test_replace_head_helper():
    model = create_model("ms_resnet_tiny", num_classes=10)
    old = model.fc.weight.detach().clone()
    replace_head(model)
    assert model.fc.weight.shape == old.shape and not torch.equal(model.fc.weight, old)
    replace_head(model, 3)
    assert model.fc.out_features == 3


def test_unreadable_and_missing_files(tmp_path):
    model = create_model("ms_resnet_tiny", num_classes=10)
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_checkpoint(model, tmp_path / "nope.pth.tar")
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="bad.pth.tar"):
        load_checkpoint(model, bad)
    odd = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, odd)
    with pytest.raises(CheckpointFormatError, match="no state dict found"):
        load_checkpoint(model, odd)


# ---------------------------------------------------------------------------------------------
# released weights
# ---------------------------------------------------------------------------------------------

PAPER = {
    # name: (dataset, model, method, classes, top-1)
    "dvscifar10_baseline": ("CIFAR10-DVS", "ms_resnet18", "Baseline", 10, 65.6),
    "dvscifar10_transferI": ("CIFAR10-DVS", "ms_resnet18", "Transfer-I", 10, 83.1),
    "dvscifar10_transferII": ("CIFAR10-DVS", "ms_resnet18", "Transfer-II", 10, 92.5),
    "cifar10_baseline": ("I2E-CIFAR10", "ms_resnet18", "Baseline-I", 10, 85.07),
    "cifar10_augmentation": ("I2E-CIFAR10", "ms_resnet18", "Baseline-II", 10, 89.23),
    "cifar10_transfer": ("I2E-CIFAR10", "ms_resnet18", "Transfer-I", 10, 90.86),
    "cifar100_baseline": ("I2E-CIFAR100", "ms_resnet18", "Baseline-I", 100, 51.32),
    "cifar100_augmentation": ("I2E-CIFAR100", "ms_resnet18", "Baseline-II", 100, 60.68),
    "cifar100_transfer": ("I2E-CIFAR100", "ms_resnet18", "Transfer-I", 100, 64.53),
    "imagenet_baseline_18": ("I2E-ImageNet", "ms_resnet18", "Baseline-I", 1000, 48.30),
    "imagenet_augmentation_18": ("I2E-ImageNet", "ms_resnet18", "Baseline-II", 1000, 57.97),
    "imagenet_finetune_18": ("I2E-ImageNet", "ms_resnet18", "Transfer-I", 1000, 59.28),
    "imagenet_augmentation_34": ("I2E-ImageNet", "ms_resnet34", "Baseline-II", 1000, 60.50),
}


def test_released_weights_table():
    assert set(RELEASED_WEIGHTS) == set(PAPER) and len(RELEASED_WEIGHTS) == 13
    for name, (dataset, model, method, classes, top1) in PAPER.items():
        w = RELEASED_WEIGHTS[name]
        assert (w.name, w.dataset, w.model, w.method, w.num_classes, w.top1) == (
            name, dataset, model, method, classes, top1,
        )
        assert w.filename == name + ".pth.tar" and w.timesteps == 8 and w.repo_id == "Ruichen0424/I2E"
        if dataset == "CIFAR10-DVS":
            assert (w.input_kind, w.ratio, w.order, w.resolution) == ("dvs", None, None, 128)
        elif dataset == "I2E-ImageNet":
            assert (w.input_kind, w.ratio, w.order, w.resolution) == ("images", 0.12, 4, 224)
        else:
            assert (w.input_kind, w.ratio, w.order, w.resolution) == ("images", 0.07, 4, 128)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the hub calls of i2e_train.models.hub; record what was asked."""
    calls = {"list": [], "download": []}
    listing = [
        ".gitattributes",
        "README.md",
        "CIFAR10/cifar10_baseline.pth.tar",
        "CIFAR10/cifar10_augmentation.pth.tar",
        "DVS/dvscifar10_transferII.pth.tar",
    ]
    payload: dict[str, Path] = {}

    def list_repo_files(repo_id, *, revision=None, **kw):
        calls["list"].append((repo_id, revision))
        return listing

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kw):
        calls["download"].append((repo_id, filename, revision, local_dir))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        source = payload.get(Path(filename).name)
        target.write_bytes(source.read_bytes() if source else b"weights")
        return str(target)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    calls["payload"] = payload
    return calls


def test_resolve_released_downloads_by_listing(tmp_path, fake_hub):
    cache = tmp_path / "ckpts"
    path = resolve_released("cifar10_augmentation", cache_dir=cache)
    assert path == cache / "CIFAR10" / "cifar10_augmentation.pth.tar" and path.is_file()
    assert fake_hub["list"] == [("Ruichen0424/I2E", None)]
    assert fake_hub["download"] == [("Ruichen0424/I2E", "CIFAR10/cifar10_augmentation.pth.tar", None, str(cache))]

    # second time: found in the cache, no hub call
    assert resolve_released("released:cifar10_augmentation.pth.tar", cache_dir=cache) == path
    assert len(fake_hub["list"]) == 1 and len(fake_hub["download"]) == 1


def test_resolve_released_prefers_the_cache(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(hub, "list_repo_files", boom)
    monkeypatch.setattr(hub, "hf_hub_download", boom)
    for ext in (".pth.tar", ".pth", ".safetensors"):  # each name the hub may use, right in the cache folder
        target = tmp_path / ext / f"imagenet_augmentation_34{ext}"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"x")
        assert resolve_released("imagenet_augmentation_34", cache_dir=target.parent) == target


def test_released_file_missing_from_the_repo_listing(tmp_path, fake_hub):
    with pytest.raises(ReleasedWeightsUnavailable) as err:
        resolve_released("cifar100_transfer", cache_dir=tmp_path)
    msg = str(err.value)
    assert "no file named cifar100_transfer.pth.tar" in msg and "README.md" in msg
    assert fake_hub["download"] == []


def test_create_model_with_released_weights(tmp_path, fake_hub):
    src = trained_model("ms_resnet18", num_classes=10)
    # a numpy scalar (as official files may hold) is one of the safe globals: read without unpickling code
    payload = official_checkpoint(src, tmp_path / "src.pth.tar", best_acc1=np.float64(92.5))
    assert load_checkpoint(create_model("ms_resnet18", num_classes=10), payload).best_acc1 == pytest.approx(92.5)
    fake_hub["payload"]["dvscifar10_transferII.pth.tar"] = payload
    cache = tmp_path / "cache"
    model = create_model("ms_resnet18", pretrained="released:dvscifar10_transferII", cache_dir=cache)
    assert model.num_classes == 10 and model.fc.out_features == 10  # class count from the table
    report = model.load_report
    assert report.released is RELEASED_WEIGHTS["dvscifar10_transferII"] and report.epoch == 5
    assert report.best_acc1 == pytest.approx(92.5)
    assert Path(report.source) == cache / "DVS" / "dvscifar10_transferII.pth.tar"
    assert_same_state(src, model)

    # the bare name works too, and so does fine-tuning with a new head
    other = create_model("ms_resnet18", num_classes=3, pretrained="dvscifar10_transferII", cache_dir=cache, replace_head=True)
    assert other.fc.out_features == 3 and other.load_report.head_replaced
    assert torch.equal(other.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_unknown_released_name():
    with pytest.raises(ValueError, match="Did you mean 'cifar10_baseline'"):
        resolve_released("cifar10_basline")
    with pytest.raises(ValueError, match="unknown released weight"):
        load_checkpoint(create_model("ms_resnet_tiny"), "released:nothing_like_it")


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*a, **k):
        raise LocalEntryNotFoundError("Connection error, and the file is not in the local cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "list_repo_files", unreachable)
    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(ReleasedWeightsUnavailable) as err:
        load_checkpoint(create_model("ms_resnet18", num_classes=10), "released:cifar10_baseline", cache_dir=tmp_path)
    msg = str(err.value)
    assert "cifar10_baseline.pth.tar" in msg and "LocalEntryNotFoundError" in msg
    assert "https://huggingface.co/Ruichen0424/I2E" in msg and str(tmp_path / "cifar10_baseline.pth.tar") in msg
    assert isinstance(err.value, FileNotFoundError)


def test_hf_hub_offline_env_skips_the_network(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("offline mode must not touch the hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "list_repo_files", boom)
    with pytest.raises(ReleasedWeightsUnavailable, match="HF_HUB_OFFLINE") as err:
        resolve_released("imagenet_finetune_18", cache_dir=tmp_path)
    assert str(tmp_path / "imagenet_finetune_18.pth.tar") in str(err.value)
