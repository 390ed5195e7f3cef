"""i2e-viz: events -> GIF (one frame per timestep) + PNG strip, ON/OFF colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from i2e_train import viz
from i2e_train.codec import encode_record
from i2e_train.data.writer import write_shard


def _colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()}


def _shape_image(path) -> None:
    im = Image.new("RGB", (40, 40), (30, 60, 120))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 32, 32), fill=(240, 200, 40))
    d.rectangle((2, 26, 14, 38), fill=(200, 30, 30))
    im.save(path)


def test_event_frames_colours_and_upscaling():
    ev = np.zeros((8, 2, 4, 5), dtype=bool)
    ev[:, 0, 0, 0] = True  # ON only
    ev[:, 1, 0, 1] = True  # OFF only
    ev[:, :, 0, 2] = True  # both
    frames = viz.event_frames(ev, scale=3)
    assert frames.shape == (8, 12, 15, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 0, 0]) == viz.ON_COLOR and tuple(frames[5, 2, 2]) == viz.ON_COLOR
    assert tuple(frames[0, 0, 3]) == viz.OFF_COLOR
    assert tuple(frames[0, 0, 6]) == viz.BOTH_COLOR
    assert tuple(frames[0, 11, 14]) == viz.BACKGROUND
    assert viz.event_frames(ev, scale=None, min_side=32).shape[1:3] == (32, 40)
    # the same frames from every kind of input
    rec = encode_record(ev)
    for x in (rec, {"data": rec}, torch.from_numpy(ev).float(), ev[:, None]):
        assert np.array_equal(viz.event_frames(x, scale=3), frames)


def test_render_image_gif_has_8_frames_with_source_and_both_colours(tmp_path):
    src = tmp_path / "shape.png"
    _shape_image(src)
    events, image = viz.image_events(src, resolution=32, ratio=0.07)
    assert events.shape == (8, 2, 32, 32) and image.shape == (32, 32, 3)
    files = viz.render(events, tmp_path / "out", name="shape", image=image)
    assert files.gif.is_file() and files.png.is_file()
    gif = Image.open(files.gif)
    assert gif.n_frames == 8
    panel = 32 * 4  # auto upscaling: short side >= 128
    assert gif.size[0] == 2 * panel + 4  # source image | events
    for t in range(8):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        ev_panel = frame[:panel, panel + 4 :]
        want = viz.event_frames(events[t : t + 1], scale=4)[0]
        assert np.array_equal(ev_panel, want)  # exact colours, no GIF quantisation drift
        cols = {tuple(c) for c in ev_panel.reshape(-1, 3).tolist()}
        assert viz.ON_COLOR in cols and viz.OFF_COLOR in cols
        left = frame[:panel, :panel].reshape(-1, 3).astype(float)  # the source image (palette-quantised)
        assert np.abs(left.mean(0) - image.reshape(-1, 3).mean(0)).max() < 4
    strip = Image.open(files.png)
    assert strip.size == (9 * panel + 8 * 4, panel)  # source + 8 timesteps
    cols = _colours(strip)
    assert viz.ON_COLOR in cols and viz.OFF_COLOR in cols


def test_render_without_source_and_cli_on_a_dataset_row(tmp_path):
    rng = np.random.default_rng(0)
    events = rng.random((3, 8, 2, 8, 8)) < 0.2
    shard = tmp_path / "ds" / "I2E-X" / "train-00000-of-00001.parquet"
    write_shard(shard, [f"{i}/{i}.npy" for i in range(3)], [0, 1, 2], [encode_record(e) for e in events],
                ["0", "1", "2"])
    row = viz.load_row(tmp_path / "ds", "I2E-X", "train", 2)
    assert row["file_path"] == "2/2.npy" and row["label_name"] == "2"
    files = viz.render(row, tmp_path / "plain", name="row", scale=2)
    gif = Image.open(files.gif)
    assert gif.n_frames == 8 and gif.size == (16, 16 + 4)  # frame + timeline bar
    assert Image.open(files.png).size == (8 * 16 + 7 * 4, 16)
    with pytest.raises(IndexError, match="3 rows"):
        viz.load_row(shard, index=3)

    from hydra.core.global_hydra import GlobalHydra

    from i2e_train.config import call_target, compose

    GlobalHydra.instance().clear()
    cfg = compose("viz", [f"input={tmp_path / 'ds'}", "config=I2E-X", "index=1", f"out={tmp_path / 'cli'}"])
    GlobalHydra.instance().clear()
    got = call_target(cfg)
    assert got.gif.name == "train-1-1_1.gif" and Image.open(got.gif).n_frames == 8

    rec = tmp_path / "sample.npy"
    rec.write_bytes(encode_record(events[0]))
    cfg = compose("viz", [f"input={rec}", f"out={tmp_path / 'cli'}", "scale=1"])
    GlobalHydra.instance().clear()
    got = call_target(cfg)
    assert np.array_equal(np.asarray(Image.open(got.png).convert("RGB"))[:, :8], viz.event_frames(events[0])[0])
