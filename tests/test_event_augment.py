"""data.augment=[...]: NDA's policies and EventDrop's drops on the device, batched, seeded per batch,
resumed exactly mid-epoch."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from i2e_train.data.augment import EventAugment
from i2e_train.data.event_augment import AUGMENTS, EventPipeline, batch_generator, build_event_augment

sys.path.insert(0, str(Path(__file__).parent))
from test_recovery import _Stop, _StopAt  # noqa: E402

OPS = ["roll", "rotate", "shear", "nda", "nda_cutmix", "drop_random", "drop_time", "drop_area", "event_drop",
       "crop", "hflip", "mixup_cutmix", "temporal_delete"]
MIXING = ["nda_cutmix", "mixup_cutmix"]  # the entries that mix samples (soft labels)
BLENDS = ["mixup_cutmix"]  # MixUp blends two samples: values stay in the inputs' range, not 0/1


def _events(kind: str, seed: int = 0) -> torch.Tensor:
    """[T=4, B=6, 2, 16, 16]: I2E-like 0/1 events or real-recording counts (integers up to 5)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        return (torch.rand(4, 6, 2, 16, 16, generator=g) < 0.3).float()
    return torch.randint(0, 6, (4, 6, 2, 16, 16), generator=g).float()


def _run(spec, events, seed=0, k=10):
    spec = {"name": "temporal_delete", "keep": 2} if spec == "temporal_delete" else spec  # keep has no default
    aug = build_event_augment([spec], num_classes=k)
    targets = torch.arange(events.shape[1]) % k
    return aug(events.clone(), targets, batch_generator(events.device, seed, 0, 0))


def test_every_registered_operation_is_tested():
    assert sorted(AUGMENTS) == sorted(OPS)


@pytest.mark.parametrize("kind", ["binary", "counts"])
@pytest.mark.parametrize("name", OPS)
def test_shape_and_values_stay_events(name, kind):
    x = _events(kind)
    y, t = _run(name, x)
    want = (2, *x.shape[1:]) if name == "temporal_delete" else x.shape  # keep=2 of T=4 frames
    assert y.shape == want and y.dtype == x.dtype
    if name in BLENDS:  # blends: a convex combination of two samples, in the inputs' range
        assert y.min() >= 0 and y.max() <= x.max()
    elif kind == "binary":
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    else:
        assert torch.equal(y, y.round()) and y.min() >= 0 and y.max() <= x.max()
    if name.startswith("drop") or name == "event_drop":
        assert (y <= x).all(), "drops only remove events"
        assert y.sum() < x.sum()
    elif name not in ("crop", "hflip", "temporal_delete"):
        assert not torch.equal(y, x), f"{name} changed nothing"
    if name in MIXING:
        assert t.shape == (6, 10) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        assert (t.max(1).values < 1).any(), f"{name} mixed no label"
    else:
        assert torch.equal(t, torch.arange(6) % 10), f"{name} changed the labels"


def test_temporal_delete_keeps_whole_frames_in_order():
    x = _events("counts")
    chosen = set()
    for seed in range(8):
        y, _ = _run("temporal_delete", x, seed=seed)
        kept = [i for j in range(2) for i in range(4) if torch.equal(y[j], x[i])]  # source frame of each output
        assert len(kept) == 2 and kept[0] < kept[1], f"seed {seed}: frames {kept}, not two in time order"
        chosen.add(tuple(kept))
    assert len(chosen) > 1, "the kept frames are drawn"


@pytest.mark.parametrize("name", OPS)
def test_each_operation_same_seed_same_batch_other_batch_other_draw(name):
    """Determinism under a seed: the draws are a function of (seed, epoch, batch, rank) only."""
    x = _events("counts")
    a, ta = _run(name, x, seed=1)
    b, tb = _run(name, x, seed=1)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    others = [_run(name, x, seed=s) for s in (2, 3, 4)]
    assert any(not torch.equal(a, o) for o, _ in others), f"{name}: the same draw for every seed"


def test_geometric_policies_move_whole_pixels():
    """Roll is a permutation of the pixels; rotate / shear copy pixels (nearest) or leave zeros."""
    x = _events("counts")
    y, _ = _run({"name": "roll", "max_shift": 3}, x)
    assert torch.equal(y.sum((0, 2, 3, 4)), x.sum((0, 2, 3, 4))), "roll keeps every event"
    for name in ("rotate", "shear"):
        y, _ = _run({"name": name, "max_degrees": 30} if name == "rotate" else name, x)
        assert set(torch.unique(y).tolist()) <= set(torch.unique(x).tolist())


def test_cutmix_labels_sum_to_one_and_follow_the_area():
    x = _events("binary")
    y, soft = _run({"name": "nda_cutmix", "alpha": 1.0}, x, seed=3)
    assert soft.shape == (6, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    own = torch.arange(6) % 10
    foreign = (y != x).any(0).any(1)  # [B, H, W]: pixels that came from the partner
    assert (soft[torch.arange(6), own] <= 1).all() and (soft[torch.arange(6), own] < 1).any(), "some labels mixed"
    # a pixel that differs lies in the box, so the own share is at most 1 - changed / (H * W)
    assert (soft[torch.arange(6), own] <= 1 - foreign.flatten(1).float().mean(1) + 1e-6).all()


def test_same_seed_same_batch_other_seed_other_batch():
    x = _events("binary")
    spec = [{"name": "nda"}, {"name": "nda_cutmix", "p": 1.0}, "event_drop"]
    aug = build_event_augment(spec, num_classes=10)
    t = torch.arange(6)
    a = aug(x.clone(), t, batch_generator(x.device, 1, 2, 3))
    b = aug(x.clone(), t, batch_generator(x.device, 1, 2, 3))
    c = aug(x.clone(), t, batch_generator(x.device, 1, 2, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_config_forms_and_bad_entries():
    assert isinstance(build_event_augment(None, 10), EventAugment) and not build_event_augment(None, 10).active
    assert isinstance(build_event_augment({"crop_padding": 2, "hflip": 0.5}, 10), EventAugment)
    pipe = build_event_augment(["nda", {"name": "drop_area", "max_ratio": 0.5}], 10)
    assert isinstance(pipe, EventPipeline) and pipe.active and not pipe.mixes
    with pytest.raises(ValueError, match=r"data.augment\[0\].*'ndaa'.*Did you mean"):
        build_event_augment(["ndaa"], 10)
    with pytest.raises(ValueError, match=r"data.augment\[1\].*roll.*unexpected keyword"):
        build_event_augment(["nda", {"name": "roll", "shift": 3}], 10)
    with pytest.raises(ValueError, match="p must be in"):
        build_event_augment([{"name": "roll", "p": 2}], 10)
    with pytest.raises(ValueError, match=r"data.augment\[0\].*temporal_delete.*keep"):
        build_event_augment(["temporal_delete"], 10)
    assert build_event_augment(["mixup_cutmix"], 10).mixes


# --------------------------------------------------------------------------- exact resume mid-epoch
# every entry, so that each one's draws must come back exactly after the resume
RESUME_SPEC = [{"name": "roll", "p": 0.5}, {"name": "rotate", "p": 0.3}, {"name": "shear", "p": 0.3}, "nda",
               {"name": "crop", "padding": 1}, "hflip", {"name": "drop_random", "p": 0.5},
               {"name": "drop_time", "max_ratio": 0.5}, {"name": "drop_area", "p": 0.5}, "event_drop",
               {"name": "nda_cutmix", "p": 0.5}, "mixup_cutmix", {"name": "temporal_delete", "keep": 1}]


def test_resume_spec_holds_every_operation():
    assert sorted({e if isinstance(e, str) else e["name"] for e in RESUME_SPEC}) == sorted(OPS)


class _Seen(L.Callback):
    """The (augmented) batches the model trained on, by global step."""

    def __init__(self):
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = (batch[0].clone(), batch[1].clone())


def _fit(root, data_root, ckpt_path=None, stop=None):
    from torch import nn

    from i2e_train.callbacks import StepCheckpoint
    from i2e_train.data import I2EDataModule
    from i2e_train.module import SNNClassifier
    from i2e_train.recovery import AtomicCheckpointIO, recovery_callbacks

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * 8 * 8, 4)

        def forward(self, x):  # [T, B, C, H, W] -> [B, 4]
            return self.fc(x.mean(0).flatten(1))

    L.seed_everything(5)
    dm = I2EDataModule(name="Tiny", path=str(data_root), data_dir=str(root / "cache"), num_classes=4,
                       resolution=[8, 8], timesteps=2, batch_size=8, num_workers=0, seed=5,
                       augment=RESUME_SPEC)
    module = SNNClassifier(Net(), num_classes=4, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    seen = _Seen()
    ckpts = root / "checkpoints"
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True, enable_version_counter=False),
                 StepCheckpoint(ckpts, every_n_train_steps=2), *recovery_callbacks(root), seen]
    trainer = L.Trainer(max_epochs=2, deterministic=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks + ([stop] if stop else []), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, seen.batches


def test_resumed_mid_epoch_sees_exactly_the_augmented_batches_of_the_uninterrupted_run(tmp_path):
    from i2e_train.codec import encode_record
    from i2e_train.data.writer import shard_name, write_shard

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("validation", 8)):
        labels = [i % 4 for i in range(n)]
        records = [encode_record(rng.random((2, 2, 8, 8)) < 0.2 + 0.15 * c) for c in labels]
        write_shard(tmp_path / "data" / "Tiny" / shard_name(split, 0, 1), [f"{c}/{i}.npy" for i, c in
                    enumerate(labels)], labels, records, [str(c) for c in range(4)])
    clean, clean_seen = _fit(tmp_path / "clean", tmp_path / "data")
    with pytest.raises(_Stop):
        _fit(tmp_path / "run", tmp_path / "data", stop=_StopAt(step=3))
    resumed, resumed_seen = _fit(tmp_path / "run", tmp_path / "data",
                                 ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert sorted(resumed_seen) == list(range(2, 10)), "resumed after the step-2 checkpoint"
    for step, (events, targets) in resumed_seen.items():
        assert torch.equal(events, clean_seen[step][0]) and torch.equal(targets, clean_seen[step][1]), step
    assert any(t.dim() == 2 for _, t in clean_seen.values()), "CutMix mixed some batches (soft labels)"
    for (k, v), w in zip(clean.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_real_recording_frames_are_augmented_in_training_only(tmp_path):
    """RealEventsDataModule (N-MNIST in the ATIS format through tonic): counts stay integers, the batch's
    draws are a function of the trainer's position."""
    from types import SimpleNamespace

    from test_real_events import _dm, make_nmnist

    make_nmnist(tmp_path, train=1, test=1)
    dm = _dm("N-MNIST", tmp_path, augment=["event_drop", "nda"])
    dm.prepare_data()
    dm.setup()
    frames, labels = next(iter(dm.val_dataloader()))
    plain, _ = dm.on_after_batch_transfer((frames, labels))

    def at(batch):
        progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
        return SimpleNamespace(training=True, current_epoch=0, global_rank=0,
                               fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))

    dm.trainer = at(0)
    a, _ = dm.on_after_batch_transfer((frames, labels))
    b, _ = dm.on_after_batch_transfer((frames, labels))
    dm.trainer = at(1)
    c, _ = dm.on_after_batch_transfer((frames, labels))
    assert a.shape == plain.shape and torch.equal(a, a.round()) and plain.max() > 1, "counts, not bits"
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
