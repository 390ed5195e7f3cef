"""Decoding throughput: I2EDataModule (packed batches) vs the dataset card's per-sample recipe.

Both read the same generated I2E-CIFAR10-shaped parquet (random events, 8x2x128x128, ~6% event
rate, written with ``writer.write_shard``) through a torch DataLoader with the same worker
count, batch size and shuffling, side by side in one run, alternating which goes first,
reporting medians over the repeats:

  (a) samples/s out of the DataLoader
        ours:     I2EDataModule.train_dataloader()  -> (packed uint8 [B, N], labels)
        baseline: per row ``np.load(io.BytesIO(data))``, ``np.unpackbits``, reshape (T, C, H, W),
                  float32, one sample at a time, default collate -> float32 [B, T, C, H, W]
  (b) samples/s of model-ready float32 [T, B, C, H, W] batches on the CPU
        ours:     loader + ``codec.unpack_events``
        baseline: loader + permute to time-first (+ contiguous, what the first conv needs)
  (c) bytes per sample handed to the device (packed uint8 vs float32: 1/32)


    python benchmarks/decode.py --rows 4096 --workers 2 --batch-size 128 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from i2e_train.codec import packed_size, record_prefix, unpack_events
from i2e_train.data import I2EDataModule
from i2e_train.data.writer import shard_name, write_card, write_shard

CONFIG = "I2E-CIFAR10"
SHAPE = (8, 2, 128, 128)


def make_data(root: Path, rows: int, rate: float = 0.06, rows_per_shard: int = 1024, seed: int = 0) -> None:
    """<root>/I2E-CIFAR10/{train,validation}-*.parquet with iid Bernoulli(rate) events."""
    rng = np.random.default_rng(seed)
    n = packed_size(SHAPE)
    pop = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    byte_p = rate**pop * (1 - rate) ** (8 - pop)  # each byte = 8 independent event bits
    byte_p /= byte_p.sum()
    prefix = record_prefix(SHAPE)
    names = [str(c) for c in range(10)]
    for split, count in (("train", rows), ("validation", max(10, rows // 32))):
        shards = -(-count // rows_per_shard)
        for s in range(shards):
            lo, hi = s * rows_per_shard, min((s + 1) * rows_per_shard, count)
            payload = rng.choice(256, size=(hi - lo, n), p=byte_p).astype(np.uint8)
            labels = [i % 10 for i in range(lo, hi)]
            write_shard(root / CONFIG / shard_name(split, s, shards), [f"{lab}/{i}.npy" for i, lab in zip(range(lo, hi), labels)],
                        labels, [prefix + p.tobytes() for p in payload], names)
    write_card(root, {CONFIG: ["train", "validation"]})


class CardRecipe(Dataset):
    """The dataset card's recipe, one row at a time."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        arr = np.load(io.BytesIO(row["data"]))  # 1-D uint8: (T, C, H, W) as 4 uint16, then packed bits
        shape = tuple(int(x) for x in arr[:8].view("<u2"))
        bits = np.unpackbits(arr[8:])[: int(np.prod(shape))]
        events = bits.reshape(shape).astype(np.float32)
        return torch.from_numpy(events), row["label"]


def epoch(loader, to_model=None) -> tuple[float, int, int]:
    """One pass: (seconds, samples, bytes per sample of the first batch's event tensor)."""
    t0 = time.perf_counter()
    samples, per = 0, 0
    for x, y in loader:
        if per == 0:
            per = x.nbytes // x.shape[0]
        if to_model is not None:
            out = to_model(x)
            assert out.dtype == torch.float32 and out.shape[0] == SHAPE[0]
        samples += y.shape[0]
    return time.perf_counter() - t0, samples, per


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="i2e-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(root, args.rows)
        print(f"generated {args.rows} rows of {SHAPE} in {time.perf_counter() - t0:.1f} s under {root}", flush=True)

        dm = I2EDataModule(name=CONFIG, path=str(root), data_dir=str(root / "data"), batch_size=args.batch_size,
                           num_workers=args.workers, pin_memory=False)
        dm.setup()
        ours = dm.train_dataloader()
        files = sorted(str(p) for p in (root / CONFIG).glob("train-*.parquet"))
        hf = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                   cache_dir=str(root / "data" / "hf-cache"))
        base = DataLoader(CardRecipe(hf), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          persistent_workers=args.workers > 0)

        def ours_model(packed):
            return unpack_events(packed, SHAPE, torch.float32)  # [T, B, C, H, W]

        def base_model(x):
            return x.permute(1, 0, 2, 3, 4).contiguous()  # [B, T, C, H, W] -> [T, B, C, H, W]

        contenders = [("ours", ours, ours_model), ("base", base, base_model)]
        runs = {(m, k): [] for m in "ab" for k, _, _ in contenders}
        bytes_per = {}
        for name, loader, _ in contenders:  # warm-up: start the workers, fill caches
            _, _, bytes_per[name] = epoch(loader)
        for r in range(args.repeats):
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]  # rotate who goes first
            for name, loader, model in order:
                for metric, fn in (("a", None), ("b", model)):
                    sec, n, _ = epoch(loader, fn)
                    runs[(metric, name)].append(n / sec)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{m}/{k} {v[-1]:,.0f}/s" for (m, k), v in runs.items()), flush=True)

    med = {f"{m}_{k}": statistics.median(v) for (m, k), v in runs.items()}
    res = {
        "rows": args.rows, "workers": args.workers, "batch_size": args.batch_size, "repeats": args.repeats,
        "shape": list(SHAPE), "torch_threads": torch.get_num_threads(), **med,
        "a_ratio": med["a_ours"] / med["a_base"], "b_ratio": med["b_ours"] / med["b_base"],
        "bytes_ours": bytes_per["ours"], "bytes_base": bytes_per["base"],
        "c_ratio": bytes_per["ours"] / bytes_per["base"],
    }
    print()
    print(f"I2E-CIFAR10-shaped data, {args.rows} rows {SHAPE}, {args.workers} workers, batch {args.batch_size}, "
          f"median of {args.repeats}")
    head = f"{'measure':<44}{'I2EDataModule':>15}{'card recipe':>13}{'ratio':>8}"
    print(head)
    for m, label, fmt in (("a", "(a) samples/s out of the DataLoader", ".1f"),
                          ("b", "(b) samples/s model-ready [T,B,C,H,W] f32", ".2f")):
        line = f"{label:<44}{med[m + '_ours']:>15,.0f}{med[m + '_base']:>13,.0f}{res[m + '_ratio']:>7{fmt}}x"
        print(line)
    print(f"{'(c) bytes/sample handed to the device':<44}{res['bytes_ours']:>15,}{res['bytes_base']:>13,}"
          f"{'1/' + format(1 / res['c_ratio'], '.0f'):>8}")
    targets = {"a": res["a_ratio"] >= 10, "b": res["b_ratio"] >= 1, "c": res["c_ratio"] == 1 / 32}
    print("targets (I2EDataModule): (a) >= 10x {}, (b) >= 1x {}, (c) = 1/32 {}".format(
        *("met" if targets[k] else "MISSED" for k in "abc")))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
