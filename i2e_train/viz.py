"""Pictures of event streams: an animated GIF (one frame per timestep) and a PNG strip.

Events [T, 2, H, W] (channel 0 = ON, 1 = OFF) come from a record (bytes or a ``.npy``
file), a dataset row, an array/tensor, or an image passed through the converter. Colours on a
dark background: ON red, OFF blue, a pixel with both white. Small resolutions are upscaled
(nearest) so that the short side is at least ``min_side`` pixels. When a source image is
given it is shown on the left of every GIF frame and at the start of the strip.

``event_frames`` returns the coloured frames as uint8 [T, H, W, 3] (for wandb videos:
``wandb.Video(frames.transpose(0, 3, 1, 2), fps=4)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from i2e_train.files import atomic_write

__all__ = [
    "BACKGROUND", "ON_COLOR", "OFF_COLOR", "BOTH_COLOR",
    "as_events", "event_frames", "image_events", "load_row", "render", "render_input", "VizFiles",
]

BACKGROUND = (16, 16, 16)
ON_COLOR = (255, 64, 64)
OFF_COLOR = (64, 160, 255)
BOTH_COLOR = (255, 255, 255)
_GAP = 4  # pixels between panels
_BAR = 4  # height of the timeline bar under each GIF frame
_BAR_DONE, _BAR_TODO = (200, 200, 200), (60, 60, 60)
_GAP_COLOR = (40, 40, 40)


@dataclass(frozen=True)
class VizFiles:
    gif: Path
    png: Path


# --------------------------------------------------------------------------- inputs
def as_events(x: Any) -> np.ndarray:
    """Record bytes, a dataset row ({"data": ...}), a .npy path, or an array/tensor
    [T, 2, H, W] (or [T, 1, 2, H, W]) -> bool ndarray [T, 2, H, W]."""
    from i2e_train.codec import decode_record

    if isinstance(x, dict):
        if "data" not in x:
            raise ValueError(f"dataset row has no 'data' field (keys: {sorted(x)})")
        x = x["data"]
    if isinstance(x, (str, Path)):
        x = _read_npy_events(Path(x))
    if isinstance(x, (bytes, bytearray, memoryview)):
        x = decode_record(bytes(x))
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 4 or arr.shape[1] != 2:
        raise ValueError(f"events must be [T, 2, H, W] (ON, OFF), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("events must be binary (0/1)")
        arr = arr.astype(bool)
    return arr


def _read_npy_events(path: Path) -> np.ndarray:
    """A record file (the released .npy format) or a .npy holding a [T, 2, H, W] array."""
    from i2e_train.codec import RecordError, decode_record

    if not path.is_file():
        raise FileNotFoundError(f"events file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        return decode_record(raw, where=str(path))
    except RecordError as rec_err:
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception:  # noqa: BLE001
            raise rec_err from None
        if arr.ndim in (4, 5):
            return as_events(arr)
        raise rec_err from None


def image_events(image, resolution: int | Sequence[int] | None = None, ratio: float = 0.07,
                 order: int | Sequence[int] = 4, where: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """An image (path, PIL, bytes) -> (events bool [T, 2, H, W], preprocessed RGB uint8 [H, W, 3]).

    Standard preprocessing (RGB, bicubic resize to ``resolution``; None keeps the size) and the
    converter in eval mode."""
    from i2e_train.data.preprocess import preprocess_image
    from i2e_train.data.sources import load_image
    from i2e_train.i2e import I2E

    img = load_image(image, str(image) if isinstance(image, (str, Path)) else where)
    if resolution is None:
        size = (img.size[1], img.size[0])
    elif isinstance(resolution, (int, np.integer)):
        size = (int(resolution), int(resolution))
    else:
        size = tuple(int(r) for r in resolution)
    x = preprocess_image(img, size, where)  # uint8 [3, H, W]
    with torch.no_grad():
        ev = I2E(ratio=ratio, order=order, dtype=torch.bool).eval()(x[None])  # [T, 1, 2, H, W]
    return ev[:, 0].numpy(), x.permute(1, 2, 0).numpy()


def load_row(path: str | Path, config: str | None = None, split: str = "train", index: int = 0) -> dict:
    """Row ``index`` of a split in a parquet file / folder / converted dataset (file_path, label, data).

    ``config`` picks the config folder in a dataset repo (released snapshot or i2e-convert
    output); a single parquet file needs none."""
    import pyarrow.parquet as pq

    from i2e_train.data.parquet import find_data_files

    p = Path(path)
    if p.is_file():
        files = [str(p)]
    else:
        found = find_data_files(p, config or "")
        if split not in found:
            raise KeyError(f"split {split!r} not found under {str(p)!r}" + (f" for config {config!r}" if config else "")
                           + f"; found: {sorted(found)}")
        files = found[split]
    offset = index
    for f in files:
        n = pq.read_metadata(f).num_rows
        if offset < n:
            pf = pq.ParquetFile(f)
            start = 0
            for rg in range(pf.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                if offset < start + rows:
                    table = pf.read_row_group(rg)
                    row = table.slice(offset - start, 1).to_pylist()[0]
                    names = _class_names(pf.schema_arrow)
                    if names is not None and row.get("label") is not None:
                        row["label_name"] = names[int(row["label"])]
                    row["where"] = f"{f} row {offset}"
                    return row
                start += rows
        offset -= n
    total = index - offset
    raise IndexError(f"row {index} out of range: split {split!r} holds {total} rows")


def _class_names(schema) -> list[str] | None:
    import json

    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feats = json.loads(meta)["info"]["features"]
        return list(feats["label"]["names"])
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- rendering
def _auto_scale(h: int, w: int, min_side: int) -> int:
    return max(1, math.ceil(min_side / max(1, min(h, w))))


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return img
    return img.repeat(scale, axis=-3).repeat(scale, axis=-2)


def event_frames(events: Any, scale: int | None = 1, min_side: int = 128, on_color=ON_COLOR,
                 off_color=OFF_COLOR, both_color=BOTH_COLOR, background=BACKGROUND) -> np.ndarray:
    """Events [T, 2, H, W] (anything ``as_events`` takes) -> frames uint8 [T, H*s, W*s, 3].

    ``scale`` = nearest-neighbour upscaling factor; None picks the smallest factor that makes
    the short side at least ``min_side``."""
    ev = as_events(events)
    t, _, h, w = ev.shape
    on, off = ev[:, 0], ev[:, 1]
    frames = np.empty((t, h, w, 3), dtype=np.uint8)
    frames[:] = np.asarray(background, dtype=np.uint8)
    frames[on & ~off] = on_color
    frames[off & ~on] = off_color
    frames[on & off] = both_color
    s = _auto_scale(h, w, min_side) if scale is None else int(scale)
    if s < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return _upscale(frames, s)


def _source_panel(image: Any, h: int, w: int) -> np.ndarray:
    """The source image as uint8 [h, w, 3] (resized to the event panel if needed, nearest)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        pil = Image.fromarray(arr[..., :3])
    else:
        from i2e_train.data.preprocess import to_rgb
        from i2e_train.data.sources import load_image

        pil = to_rgb(load_image(image))
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.NEAREST)
    return np.asarray(pil, dtype=np.uint8)


def _hstack(panels: Sequence[np.ndarray], gap: int = _GAP, fill=_GAP_COLOR) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = fill
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _timeline(t: int, steps: int, width: int) -> np.ndarray:
    bar = np.empty((_BAR, width, 3), dtype=np.uint8)
    bar[:] = _BAR_TODO
    bar[:, : max(1, round(width * (t + 1) / steps))] = _BAR_DONE
    return bar


def _keys(rgb: np.ndarray) -> np.ndarray:
    flat = rgb.reshape(-1, 3).astype(np.int64)
    return (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]


def _to_palette(frames: Sequence[np.ndarray], fixed: Sequence[tuple[int, int, int]]) -> list[Image.Image]:
    """RGB frames -> P images sharing one palette in which the ``fixed`` colours are exact.

    Other colours (a source image) get the remaining slots: exact when they fit, else a
    median-cut palette and the nearest entry. GIF would otherwise quantise every frame on its
    own and could shift the ON/OFF colours."""
    fixed = list(dict.fromkeys(tuple(int(v) for v in c) for c in fixed))
    fixed_keys = _keys(np.asarray(fixed, dtype=np.int64))
    keys = np.concatenate([_keys(f) for f in frames])
    uniq, inverse = np.unique(keys, return_inverse=True)
    uniq_rgb = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1)
    is_fixed = np.isin(uniq, fixed_keys)
    budget = 256 - len(fixed)
    rest = uniq_rgb[~is_fixed]
    if len(rest) <= budget:
        extra = rest
    else:
        q = Image.fromarray(rest.astype(np.uint8).reshape(1, -1, 3)).quantize(colors=budget, method=Image.Quantize.MEDIANCUT)
        extra = np.asarray(q.getpalette()[: 3 * budget], dtype=np.int64).reshape(-1, 3)
    lut = np.empty(len(uniq), dtype=np.uint8)
    lut[is_fixed] = [fixed.index(tuple(c)) for c in uniq_rgb[is_fixed].tolist()]
    miss = np.flatnonzero(~is_fixed)
    for s in range(0, len(miss), 4096):  # nearest palette entry among the extra colours
        part = uniq_rgb[miss[s : s + 4096]]
        d = ((part[:, None, :] - extra[None, :, :]) ** 2).sum(-1)
        lut[miss[s : s + 4096]] = d.argmin(1) + len(fixed)
    palette = [v for c in fixed for v in c] + [int(v) for v in extra.reshape(-1)]
    palette += [0] * (768 - len(palette))
    images, start = [], 0
    for f in frames:
        n = f.shape[0] * f.shape[1]
        im = Image.fromarray(lut[inverse[start : start + n]].reshape(f.shape[:2]), mode="P")
        im.putpalette(palette)
        images.append(im)
        start += n
    return images


def render(events: Any, out_dir: str | Path, name: str = "events", image: Any = None, scale: int | None = None,
           min_side: int = 128, fps: float = 4.0, loop: int = 0) -> VizFiles:
    """Write ``<out_dir>/<name>.gif`` (one frame per timestep, the source image on the left when
    given, a timeline bar below) and ``<out_dir>/<name>.png`` (source image + all timesteps side
    by side). Returns the two paths."""
    ev = as_events(events)
    t, _, h, w = ev.shape
    s = _auto_scale(h, w, min_side) if scale is None else int(scale)
    frames = event_frames(ev, scale=s)  # [T, h*s, w*s, 3]
    src = _source_panel(image, h * s, w * s) if image is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    gif_frames = []
    for i in range(t):
        panel = _hstack([src, frames[i]]) if src is not None else frames[i]
        gif_frames.append(np.concatenate([panel, _timeline(i, t, panel.shape[1])], axis=0))
    fixed = [BACKGROUND, ON_COLOR, OFF_COLOR, BOTH_COLOR, _BAR_DONE, _BAR_TODO, _GAP_COLOR]
    pimgs = _to_palette(gif_frames, fixed)
    gif = atomic_write(out_dir / f"{name}.gif", lambda fh: pimgs[0].save(
        fh, format="GIF", save_all=True, append_images=pimgs[1:], duration=int(round(1000 / fps)), loop=loop,
        optimize=False, disposal=1))
    strip = Image.fromarray(_hstack(([src] if src is not None else []) + list(frames)))
    png = atomic_write(out_dir / f"{name}.png", lambda fh: strip.save(fh, format="PNG"))
    return VizFiles(gif=gif, png=png)


# --------------------------------------------------------------------------- i2e-viz
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def _image_input(src: Path, config: str | None, resolution, ratio, order, show_source: bool):
    """An image through the converter: (events, source image or None); the catalog config's
    resolution and ratio when not given (else the image's size and 0.07), order 4 by default."""
    from i2e_train.data.catalog import CATALOG

    info = CATALOG.get(config or "")
    resolution = resolution or (info.resolution if info is not None else None)
    ratio = ratio if ratio is not None else (info.ratio if info and info.ratio else 0.07)
    events, img = image_events(src, resolution, ratio, order if order is not None else 4)
    return events, (img if show_source else None)


def _row_input(src: Path, config: str | None, split: str, index: int) -> tuple[np.ndarray, str]:
    """A dataset row: (events, a name from split, index and file_path); prints what it shows."""
    row = load_row(src, config, split, index)
    fp = str(row.get("file_path") or f"row{index}")
    print(f"{row['where']}: file_path {row.get('file_path')!r}, label {row.get('label')}"
          + (f" ({row['label_name']})" if row.get("label_name") is not None else ""))
    return as_events(row), f"{split}-{index}-" + fp.replace("/", "_").removesuffix(".npy")


def render_input(input: str | Path, config: str | None = None, split: str = "train", index: int = 0,
                 resolution: int | Sequence[int] | None = None, ratio: float | None = None,
                 order: int | Sequence[int] | None = None, out: str | Path = "viz", name: str | None = None,
                 scale: int | None = None, min_side: int = 128, fps: float = 4, show_source: bool = True) -> VizFiles:
    """``i2e-viz``: render an image (through the converter), a ``.npy`` record, or row ``index`` of
    ``split`` of a parquet file / dataset folder (``config``: its config folder) as GIF + PNG in
    ``out``. ``name`` defaults to one made from the input. See configs/viz.yaml."""
    src = Path(str(input))
    image = None
    if src.suffix.lower() in _IMAGE_SUFFIXES:
        events, image = _image_input(src, config, resolution, ratio, order, show_source)
        default = src.stem
    elif src.suffix.lower() == ".npy":
        events, default = as_events(src), src.stem
    elif src.suffix == ".parquet" or src.is_dir():
        events, default = _row_input(src, config, split, int(index))
    else:
        raise FileNotFoundError(f"input {str(src)!r}: expected an image, a .npy record, a parquet file or a dataset folder")
    files = render(events, out, name=name or default, image=image, scale=scale, min_side=int(min_side), fps=float(fps))
    print(f"wrote {files.gif} and {files.png}", flush=True)
    return files
