"""The I2E converter: static images -> 8-step binary event streams.

Algorithm (Ma et al., AAAI 2026), for images [B, 3, H, W] in [0, 1]:

1. intensity V = max over the colour channels                        [B, 1, H, W]
2. pad V by one pixel (replicate by default)                         [B, 1, H+2, W+2]
3. timestep t uses direction group ``order[t]``; a vector [a, b] of that group gives the
   response R_t(y, x) = Vpad[cell b] - Vpad[cell a] on the 3x3 grid around (y, x)
4. threshold per image: thr = ratio * (max(V) - min(V))  ("dynamic" threshold)
5. ON = R_t >= thr, OFF = -R_t >= thr                                 [T=8, B, 2, H, W]

Evaluation mode uses the canonical (first) vector of each group and is bit-identical to the
official converter, which runs one float32 ``conv2d`` with eight {-1, 0, +1} kernels: each
output there is the single-rounded float32 difference of two pixels, exactly what the slicing
below computes. Training mode draws one vector per group per forward, shared by the batch
(``direction_draw="batch"``, the official converter's ``random.choice`` per ``set_weight``), or
one per group *per sample* (``direction_draw="sample"``: a stronger augmentation, and what
i2e-train did before the recipe audit).

Edge case kept from the official code on purpose: a flat image has range 0, so thr = 0 and,
because the comparison is ``>=``, every pixel fires in both channels at every timestep.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from i2e_train import kernels

__all__ = ["DIRECTION_GROUPS", "ORDER_PRESETS", "BACKENDS", "I2E", "resolve_order", "cell_offset"]

# Cells of the 3x3 grid are numbered 1..9 row-major (1 = top-left, 5 = centre, 9 = bottom-right).
# A vector [a, b] has -1 at cell a and +1 at cell b. The first vector of each group is canonical.
DIRECTION_GROUPS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((5, 6), (1, 2), (2, 3), (4, 5), (7, 8), (8, 9)),  # g0 horizontal
    ((5, 2), (4, 1), (6, 3), (7, 4), (8, 5), (9, 6)),  # g1 vertical
    ((5, 3), (4, 2), (7, 5), (8, 6)),  # g2 diagonal
    ((5, 1), (6, 2), (8, 4), (9, 5)),  # g3 diagonal
    ((9, 4), (6, 1)),  # g4 knight move
    ((4, 3), (7, 6)),  # g5 knight move
    ((3, 8), (2, 7)),  # g6 knight move
    ((8, 1), (9, 2)),  # g7 knight move
)

# Timestep t uses group ORDER_PRESETS[p][t]. Preset 4 is the paper's default (best).
ORDER_PRESETS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6, 7),
    (0, 1, 4, 5, 6, 7, 2, 3),
    (2, 3, 0, 1, 4, 5, 6, 7),
    (2, 3, 4, 5, 6, 7, 0, 1),
    (4, 5, 6, 7, 0, 1, 2, 3),
    (4, 5, 6, 7, 2, 3, 0, 1),
)

BACKENDS = ("auto", "numba", "compiled", "torch")
DIRECTION_DRAWS = ("batch", "sample")
_PAD_MODES = {"replicate": "replicate", "reflect": "reflect", "circular": "circular", "zeros": "constant"}
_MAX_GROUP = max(len(g) for g in DIRECTION_GROUPS)


def cell_offset(cell: int) -> tuple[int, int]:
    """(row, column) of a 3x3 grid cell numbered 1..9 row-major."""
    if not 1 <= cell <= 9:
        raise ValueError(f"grid cell must be in 1..9, got {cell}")
    return (cell - 1) // 3, (cell - 1) % 3


def resolve_order(order: int | Sequence[int]) -> tuple[int, ...]:
    """An order preset number (0..5) or an explicit list of 8 group indices -> 8 group indices."""
    if isinstance(order, bool):
        raise ValueError(f"order must be a preset 0..5 or a list of 8 group indices, got {order!r}")
    if isinstance(order, int):
        if not 0 <= order < len(ORDER_PRESETS):
            raise ValueError(f"order preset must be in 0..{len(ORDER_PRESETS) - 1}, got {order}")
        return ORDER_PRESETS[order]
    groups = tuple(int(g) for g in order)
    if len(groups) != 8 or any(not 0 <= g < len(DIRECTION_GROUPS) for g in groups):
        raise ValueError(f"order must list 8 group indices in 0..7, got {list(order)}")
    return groups


class I2E(nn.Module):
    """Image-to-event converter.

    Args:
        ratio: threshold as a fraction of each image's intensity range (dynamic threshold), or
            the absolute threshold on the [0, 1] intensity scale when ``threshold="fixed"``.
        order: order preset 0..5 or an explicit list of 8 direction-group indices.
        padding_mode: "replicate" (official), "zeros", "reflect" or "circular".
        dtype: output dtype: torch.float32 (default), torch.bool or torch.uint8 for cheap storage.
        threshold: "dynamic" (paper) or "fixed" (the paper's ablation baseline).
        random_directions: in training mode, draw a random vector from each group (paper's
            augmentation); False keeps the canonical vectors in training too (ablation).
        direction_draw: "batch" (official: one draw per group per forward, shared by the batch)
            or "sample" (one draw per group and sample).
        backend: how the events are computed; every back-end gives the same bits.
            ``"numba"``: CPU kernels (`i2e_train.kernels.converter`) compute the
            intensity, then the difference and comparisons straight into float32, bool or
            uint8 output (for ``forward_packed``: both, and the bit packing, in one loop per
            image); replicate padding, float32 / uint8 images. ``"compiled"``: the dense
            output in one ``torch.compile``d kernel (gather, difference, both comparisons and
            the cast fused: one write of the output). ``"torch"``: tensor operations, any
            device and setting. ``"auto"`` (default): "compiled" on CUDA, "numba" on CPU
            where it applies, else "torch".

    ``forward(images)`` takes [B, 3, H, W] (or [B, 1, H, W] grayscale) float in [0, 1] or uint8
    in [0, 255] and returns binary events [T=8, B, 2, H, W] of ``dtype`` (channel 0 = ON).
    """

    def __init__(
        self,
        ratio: float = 0.07,
        order: int | Sequence[int] = 4,
        padding_mode: str = "replicate",
        dtype: torch.dtype | str = torch.float32,
        threshold: str = "dynamic",
        random_directions: bool = True,
        backend: str = "auto",
        direction_draw: str = "batch",
    ) -> None:
        super().__init__()
        if not ratio >= 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}")
        if threshold not in ("dynamic", "fixed"):
            raise ValueError(f"threshold must be 'dynamic' or 'fixed', got {threshold!r}")
        self.ratio = float(ratio)
        self.order = resolve_order(order)
        self.padding_mode = padding_mode
        self.dtype = _as_dtype(dtype)
        self.threshold = threshold
        self.random_directions = bool(random_directions)
        if direction_draw not in DIRECTION_DRAWS:
            raise ValueError(f"direction_draw must be one of {', '.join(DIRECTION_DRAWS)}, got {direction_draw!r}")
        self.direction_draw = direction_draw
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        # Flat offsets into the 3x3 grid (row * 3 + col), per group, padded to the longest group.
        # vec_a/vec_b: [8 groups, 6] cell indices 0..8; group_sizes: [8].
        a = torch.zeros(len(DIRECTION_GROUPS), _MAX_GROUP, dtype=torch.long)
        b = torch.zeros_like(a)
        for g, group in enumerate(DIRECTION_GROUPS):
            for i, (ca, cb) in enumerate(group):
                a[g, i], b[g, i] = ca - 1, cb - 1
        self.register_buffer("vec_a", a, persistent=False)
        self.register_buffer("vec_b", b, persistent=False)
        self.register_buffer(
            "group_sizes", torch.tensor([len(g) for g in DIRECTION_GROUPS]), persistent=False
        )
        # The order as a buffer: on the device with the module, so that drawing directions never
        # copies from the host (a copy from pageable memory makes the host wait for CUDA).
        self.register_buffer("order_groups", torch.tensor(self.order), persistent=False)  # [T]

    @property
    def timesteps(self) -> int:
        return len(self.order)

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, order={list(self.order)}, padding_mode={self.padding_mode!r}, "
            f"dtype={self.dtype}, threshold={self.threshold!r}, random_directions={self.random_directions}, "
            f"direction_draw={self.direction_draw!r}, "
            f"backend={self.backend!r}"
        )

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"I2E expects images [B, 3, H, W] (or [B, 1, H, W] grayscale), got shape {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"I2E expects float images in [0, 1] or uint8 images, got dtype {images.dtype}")

    @staticmethod
    def _nonfinite_message(images: torch.Tensor) -> str:
        return f"I2E got float images holding NaN/Inf (shape {tuple(images.shape)}); expected [0, 1]"

    def intensity(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] float in [0,1] or uint8 -> V [B, H, W] float32 (max over channels)."""
        self._check_images(images)
        if images.dtype == torch.uint8:
            # max commutes with the monotone uint8 -> [0, 1] scaling, so take it on bytes first. The
            # scaling is torchvision's v2.ToDtype(float32, scale=True), the official pipeline's:
            # x.to(float32) * float32(1/255) (differs from x / 255 in the last bit for 126 of 256 bytes).
            return images.amax(dim=1).to(torch.float32).mul_(1.0 / 255.0)
        v = images.amax(dim=1).to(torch.float32)
        finite = torch.isfinite(v).all()
        message = self._nonfinite_message(images)
        if v.device.type == "cpu":
            if not bool(finite):
                raise ValueError(message)
        else:  # checked on the device: no host synchronisation in the training loop
            torch._assert_async(finite, message)
        return v

    def thresholds(self, v: torch.Tensor) -> torch.Tensor:
        """V [B, H, W] -> per-image threshold [B] (float32)."""
        if self.threshold == "fixed":
            return torch.full((v.shape[0],), self.ratio, dtype=v.dtype, device=v.device)
        flat = v.flatten(1)
        return (flat.amax(dim=1) - flat.amin(dim=1)) * self.ratio

    def directions(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        """Cell indices (a, b) per timestep and sample: two LongTensors [T, B] (values 0..8).

        Canonical vectors in eval mode (or with random_directions=False); otherwise one random
        vector of group order[t] per t, shared by the batch (direction_draw="batch") or per
        (t, sample) ("sample").
        """
        groups = self.order_groups.to(device)  # [T]
        vec_a, vec_b = self.vec_a.to(device), self.vec_b.to(device)
        if self.training and self.random_directions:
            sizes = self.group_sizes.to(device)[groups]  # [T]
            draws = batch if self.direction_draw == "sample" else 1
            u = torch.rand(len(groups), draws, device=device, generator=generator)
            idx = (u * sizes[:, None]).long().clamp_max_(sizes[:, None] - 1)  # [T, B] or [T, 1]
            idx = idx.expand(len(groups), batch).contiguous()
        else:
            idx = torch.zeros(len(groups), batch, dtype=torch.long, device=device)
        return vec_a[groups[:, None], idx], vec_b[groups[:, None], idx]

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """images [B, C, H, W] -> events [T, B, 2, H, W] of ``self.dtype``.

        ``compute_dtype`` (float16 / bfloat16): the response as the official converter computes
        it under ``torch.autocast`` (its conv2d casts the padded intensity to that dtype and
        rounds each output to it; threshold and comparisons stay float32). None: float32, as
        the official converter outside autocast (evaluation, CPU, the released data).
        """
        if compute_dtype is not None and compute_dtype != torch.float32:
            if compute_dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"compute_dtype must be float16, bfloat16, float32 or None, got {compute_dtype}")
            return self._convert(images, generator, packed=False, round_to=compute_dtype)
        return self._convert(images, generator, packed=False)

    def forward_packed(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, C, H, W] -> packed events uint8 [B, ceil(T*2*H*W / 8)].

        Row b equals ``np.packbits`` of sample b's (T, 2, H, W) events, i.e. the payload of its
        record (see ``i2e_train.codec``), without materialising a dense event tensor.
        """
        if images.dim() == 4 and images.shape[-1] % 8 == 0 and sys.byteorder == "little":
            return self._convert(images, generator, packed=True)
        from i2e_train.codec import pack_events

        dense = I2E._convert(self, images, generator, packed=False, dtype=torch.bool)
        return pack_events(dense)

    # ------------------------------------------------------------------ back-ends
    def _numba_unsupported(self, images: torch.Tensor, out_dtype: torch.dtype) -> str | None:
        """Why the numba kernels cannot convert these images (None: they can)."""
        if images.device.type != "cpu":
            return f"the images are on {images.device}; the kernels run on CPU"
        if out_dtype not in (torch.float32, torch.bool, torch.uint8):
            return f"output dtype {out_dtype} (the kernels write float32, bool, uint8 or packed bits)"
        if images.dtype not in (torch.float32, torch.uint8):
            return f"image dtype {images.dtype} (the kernels read float32 or uint8)"
        if self.padding_mode != "replicate":
            return f"padding_mode {self.padding_mode!r} (the kernels pad by replication)"
        if kernels.load("converter") is None:
            return f"numba is unavailable ({kernels.unavailable_reason()})"
        return None

    def backend_for(self, images: torch.Tensor, out_dtype: torch.dtype | None = None) -> str:
        """The back-end that converts ``images``: ``self.backend``, or for "auto" "compiled" on
        CUDA, "numba" on CPU where the kernels cover the settings, else "torch"."""
        out_dtype = out_dtype or self.dtype
        if self.backend == "numba":
            reason = self._numba_unsupported(images, out_dtype)
            if reason is not None:
                raise ValueError(f"I2E backend='numba' cannot run here: {reason}; use backend='auto' or 'torch'")
        if self.backend != "auto":
            return self.backend
        if images.device.type == "cuda":
            return "compiled"
        return "numba" if self._numba_unsupported(images, out_dtype) is None else "torch"

    def _convert(self, images, generator, packed: bool, dtype: torch.dtype | None = None,
                 round_to: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = torch.uint8 if packed else (dtype or self.dtype)
        backend = self.backend_for(images, out_dtype) if round_to is None else "torch"
        if backend == "numba":
            return self._convert_numba(images, generator, packed, out_dtype)
        v = self.intensity(images)  # [B, H, W]
        thr = self.thresholds(v)  # [B]
        vpad = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode=_PAD_MODES[self.padding_mode]).squeeze(1)  # [B, H+2, W+2]
        if backend == "compiled" and not packed:
            cell_a, cell_b = self.directions(v.shape[0], v.device, generator)  # [T, B]
            return _fused_events()(vpad, cell_a, cell_b, thr, v.shape[1], v.shape[2], out_dtype)
        return self._convert_tensors(vpad, thr, generator, packed, out_dtype, round_to)

    def _convert_numba(self, images, generator, packed: bool, out_dtype: torch.dtype) -> torch.Tensor:
        """The conversion in numba kernels, bit-identical to the tensor path: max, the uint8
        scaling, the range, the threshold (float32), the difference and the comparisons are the
        same operations. Dense output: two passes (intensity + padding + threshold, then events);
        packed output: one parallel loop over images, each image's padded V used while in cache."""
        self._check_images(images)
        k = kernels.load("converter")
        bsz, _, h, w = images.shape
        steps = len(self.order)
        kernels.use_threads(torch.get_num_threads())
        pixels = images.detach().contiguous().numpy()
        cell_a, cell_b = self.directions(bsz, images.device, generator)  # [T, B]
        bad = torch.zeros(bsz, dtype=torch.bool)
        fixed = self.threshold == "fixed"
        if packed:  # one parallel loop over images: V, range, threshold, packed events
            out = torch.empty((bsz, steps, 2, h, w // 8), dtype=torch.uint8)
            k.i2e_packed_images(pixels, self.ratio, fixed, cell_a.numpy(), cell_b.numpy(), out.numpy(), bad.numpy())
        else:
            vpad = torch.empty((bsz, h + 2, w + 2), dtype=torch.float32).numpy()  # [B, H+2, W+2]
            thr = torch.empty(bsz, dtype=torch.float32).numpy()  # [B], as in thresholds()
            k.i2e_intensity(pixels, self.ratio, fixed, vpad, thr, bad.numpy())
        if bool(bad.any()):
            raise ValueError(self._nonfinite_message(images))
        if packed:
            return out.view(bsz, -1)
        out = torch.empty((steps, bsz, 2, h, w), dtype=out_dtype)
        k.i2e_dense(vpad, thr, cell_a.numpy(), cell_b.numpy(), out.numpy())
        return out

    def _convert_tensors(self, vpad, thr, generator, packed: bool, out_dtype: torch.dtype,
                         round_to: torch.dtype | None = None) -> torch.Tensor:
        """The tensor-operation path: events [T, B, 2, H, W] of ``out_dtype``, or packed uint8 [B, N]."""
        bsz, h, w = vpad.shape[0], vpad.shape[1] - 2, vpad.shape[2] - 2
        dev = vpad.device
        steps = len(self.order)
        random = self.training and self.random_directions
        cells = self.directions(bsz, dev, generator) if random else None  # [T, B] each
        if packed:
            out = torch.empty((bsz, steps, 2, h, w // 8), dtype=torch.uint8, device=dev)
        else:
            out = torch.empty((steps, bsz, 2, h, w), dtype=out_dtype, device=dev)
        # On CPU, work through the batch in chunks; one chunk on accelerators.
        chunk = bsz if dev.type != "cpu" else max(1, _CHUNK_PIXELS // (h * w))
        for s in range(0, bsz, chunk):
            self._events_chunk(vpad, thr, cells, out, s, min(bsz, s + chunk), packed, round_to)
        return out.view(bsz, -1) if packed else out

    def _events_chunk(self, vpad, thr, cells, out, s: int, e: int, packed: bool,
                      round_to: torch.dtype | None = None) -> None:
        """Events of samples s..e-1 into ``out`` (dense [T, B, 2, H, W] or packed [B, T, 2, H, W/8]).

        Comparisons are written straight into a float32 output. For other outputs they go
        through a float32 scratch map and a cast: PyTorch's comparison kernels vectorise only
        when the output dtype equals the input dtype."""
        h, w = vpad.shape[1] - 2, vpad.shape[2] - 2
        dev = vpad.device
        direct = not packed and out.dtype == vpad.dtype
        dense = None if packed or direct else (out.view(torch.bool) if out.dtype == torch.uint8 else out)
        vp, th = vpad[s:e], thr[s:e].view(-1, 1, 1)
        if round_to is not None:  # autocast's conv2d input: V rounded to the low-precision dtype
            vp = vp.to(round_to).to(vpad.dtype)
        thresholds = (th, -th)
        diff = torch.empty((e - s, h, w), dtype=vpad.dtype, device=dev)
        scratch = None if direct else torch.empty_like(diff)
        bits = torch.empty((e - s, h, w), dtype=torch.bool, device=dev) if packed else None
        views = torch.stack([_shift(vp, k, h, w) for k in range(9)]) if cells is not None else None  # [9, n, H, W]
        rows = torch.arange(e - s, device=dev)
        for t, g in enumerate(self.order):
            if cells is not None:  # R_t = V[cell b] - V[cell a], one (a, b) per sample
                torch.sub(views[cells[1][t, s:e], rows], views[cells[0][t, s:e], rows], out=diff)
            else:
                ca, cb = DIRECTION_GROUPS[g][0]
                torch.sub(_shift(vp, cb - 1, h, w), _shift(vp, ca - 1, h, w), out=diff)
            if round_to is not None:  # ... and its output: the difference (exact in float32) rounded once
                diff.copy_(diff.to(round_to))
            # ON: R >= thr; OFF: -R >= thr (negation is exact, so this equals R <= -thr).
            for c, compare in enumerate((torch.ge, torch.le)):
                if direct:
                    compare(diff, thresholds[c], out=out[t, s:e, c])
                    continue
                compare(diff, thresholds[c], out=scratch)  # 0.0 / 1.0
                if packed:
                    bits.copy_(scratch)
                    out[s:e, t, c] = _pack_rows(bits)
                else:
                    dense[t, s:e, c].copy_(scratch)


# Pixels per CPU chunk (16 MiB of float32 differences): few, large kernels.
_CHUNK_PIXELS = 1 << 22
# Multiplying 8 little-endian 0/1 bytes by this constant gathers them, first byte in the most
# significant bit, into the top byte of the product (the partial products never overlap).
_PACK_MAGIC = 0x8040201008040201 - (1 << 64)


def _shift(vpad: torch.Tensor, cell: int, h: int, w: int) -> torch.Tensor:
    """View of padded V [n, H+2, W+2] shifted to grid cell 0..8 -> [n, H, W]."""
    r, c = divmod(cell, 3)
    return vpad[:, r : r + h, c : c + w]


def _events_reference(vpad: torch.Tensor, cell_a: torch.Tensor, cell_b: torch.Tensor, thr: torch.Tensor,
                      h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole conversion as one expression (compiled into a single kernel by ``_fused_events``).

    vpad [B, H+2, W+2], cell_a/cell_b [T, B] (0..8), thr [B] -> events [T, B, 2, H, W] of dtype.
    """
    views = torch.stack([_shift(vpad, k, h, w) for k in range(9)])  # [9, B, H, W]
    rows = torch.arange(vpad.shape[0], device=vpad.device)
    resp = views[cell_b, rows] - views[cell_a, rows]  # [T, B, H, W], the exact float32 difference
    t = thr.view(1, -1, 1, 1)
    return torch.stack([resp >= t, resp <= -t], dim=2).to(dtype)


_FUSED = None


def _fused_events():
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(_events_reference, dynamic=None)
    return _FUSED


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., W] (contiguous, W % 8 == 0) -> uint8 [..., W / 8], MSB first like np.packbits."""
    words = bits.view(torch.uint8).view(torch.int64)  # 8 pixels per word (little-endian bytes)
    return (words * _PACK_MAGIC).view(torch.uint8)[..., 7::8]  # the product's top byte


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        out = getattr(torch, name, None)
        if not isinstance(out, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
    if out not in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"I2E output dtype must be bool, uint8 or a float type, got {out}")
    return out
