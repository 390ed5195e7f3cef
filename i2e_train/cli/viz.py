"""``i2e-viz``: a record, a dataset row or an image -> GIF + PNG strip (see configs/viz.yaml)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def run(cfg: DictConfig):
    """Render the configured input; returns ``VizFiles`` (gif, png)."""
    from i2e_train import viz
    from i2e_train.cli.convert import _plain
    from i2e_train.data.catalog import CATALOG

    c = _plain(cfg, ("input", "config", "split", "index", "resolution", "ratio", "order", "out", "name", "scale",
                     "min_side", "fps", "show_source"))
    src = Path(str(c["input"]))
    info = CATALOG.get(c.get("config") or "")
    image = None
    if src.suffix.lower() in _IMAGE_SUFFIXES:
        resolution = c.get("resolution") or (info.resolution if info is not None else None)
        ratio = c.get("ratio") if c.get("ratio") is not None else (info.ratio if info and info.ratio else 0.07)
        order = c.get("order") if c.get("order") is not None else 4
        events, img = viz.image_events(src, resolution, ratio, order)
        image = img if c.get("show_source", True) else None
        name = c.get("name") or src.stem
    elif src.suffix.lower() == ".npy":
        events = viz.as_events(src)
        name = c.get("name") or src.stem
    elif src.suffix == ".parquet" or src.is_dir():
        row = viz.load_row(src, c.get("config"), c.get("split", "train"), int(c.get("index", 0)))
        events = viz.as_events(row)
        fp = str(row.get("file_path") or f"row{c.get('index', 0)}")
        name = c.get("name") or f"{c.get('split', 'train')}-{int(c.get('index', 0))}-" + fp.replace("/", "_").removesuffix(".npy")
        print(f"{row['where']}: file_path {row.get('file_path')!r}, label {row.get('label')}"
              + (f" ({row['label_name']})" if row.get("label_name") is not None else ""))
    else:
        raise FileNotFoundError(f"input {str(src)!r}: expected an image, a .npy record, a parquet file or a dataset folder")
    files = viz.render(events, c.get("out", "viz"), name=name, image=image, scale=c.get("scale"),
                       min_side=int(c.get("min_side", 128)), fps=float(c.get("fps", 4)))
    print(f"wrote {files.gif} and {files.png}", flush=True)
    return files


@entry_point("viz")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
