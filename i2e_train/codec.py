"""Event tensors <-> the bytes of the released I2E records.

A record (the ``data`` field of a released parquet row) is the complete byte content of a
``.npy`` file (format 1.0) holding a 1-D uint8 array:

    [0:8]   four little-endian uint16: T, C, H, W
    [8:]    the event tensor (T, C, H, W), C-order, bit-packed with numpy's packbits
            convention (most significant bit first, last byte zero-padded)

Example: 8x2x128x128 events -> 8 + 32768 uint8 -> a .npy of 32,904 bytes (128-byte .npy header).

Hot path: all records of one config share the same .npy header and shape header, so a batch
of records is validated by comparing one fixed prefix and the payloads are sliced without
parsing each file (``packed_payloads``); ``unpack_events`` turns packed payloads [B, N] into
events [T, B, C, H, W] on whatever device the tensor lives on.
"""

from __future__ import annotations

import ast
import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "RecordError",
    "encode_record",
    "decode_record",
    "parse_record",
    "record_prefix",
    "record_size",
    "packed_size",
    "packed_payloads",
    "pack_events",
    "unpack_events",
    "records_from_packed",
    "records_from_events",
    "count_events",
]

_MAGIC = b"\x93NUMPY"
_ARRAY_ALIGN = 64
_GROWTH_AXIS_MAX_DIGITS = 21  # numpy writes headers with room for the shape to grow
SHAPE_HEADER_BYTES = 8


class RecordError(ValueError):
    """A record that is not a valid I2E event record (or not the expected shape)."""


@dataclass(frozen=True)
class ParsedRecord:
    shape: tuple[int, int, int, int]  # (T, C, H, W)
    payload: np.ndarray  # uint8 [packed_size(shape)]


def packed_size(shape: Sequence[int]) -> int:
    """Number of packed payload bytes for events of shape (T, C, H, W)."""
    return (int(np.prod(shape, dtype=np.int64)) + 7) // 8


def _npy_header(length: int) -> bytes:
    """The .npy 1.0 header numpy writes for a 1-D uint8 array of ``length`` (byte-exact)."""
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % length
    # numpy pads so that the shape could grow to 21 digits without rewriting the file, then
    # aligns magic + 2-byte length + header + '\n' to 64 bytes.
    d += " " * (_GROWTH_AXIS_MAX_DIGITS - len(repr(length)))
    total = len(_MAGIC) + 2 + 2 + len(d) + 1
    d += " " * ((-total) % _ARRAY_ALIGN) + "\n"
    hlen = len(d)
    return _MAGIC + b"\x01\x00" + hlen.to_bytes(2, "little") + d.encode("latin1")


def _shape_header(shape: Sequence[int]) -> bytes:
    if len(shape) != 4:
        raise RecordError(f"event tensors must be 4-D (T, C, H, W), got shape {tuple(shape)}")
    if any(not 0 < int(s) < 65536 for s in shape):
        raise RecordError(f"each of T, C, H, W must be in 1..65535 to fit the uint16 header, got {tuple(shape)}")
    return np.asarray(shape, dtype="<u2").tobytes()


def record_prefix(shape: Sequence[int]) -> bytes:
    """Bytes every record of this (T, C, H, W) starts with: .npy header + shape header."""
    return _npy_header(SHAPE_HEADER_BYTES + packed_size(shape)) + _shape_header(shape)


def record_size(shape: Sequence[int]) -> int:
    """Total byte length of a record of this (T, C, H, W)."""
    return len(record_prefix(shape)) + packed_size(shape)


def _to_numpy_bool(events) -> np.ndarray:
    if isinstance(events, torch.Tensor):
        events = events.detach().cpu().numpy()
    events = np.asarray(events)
    if events.dtype != np.bool_:
        if events.dtype.kind not in "biuf":
            raise RecordError(f"events must be boolean/binary, got dtype {events.dtype}")
        if not np.isin(events, (0, 1)).all():
            raise RecordError("events must be binary (0/1); got other values")
        events = events.astype(np.bool_)
    return events


def encode_record(events) -> bytes:
    """Events [T, C, H, W] (bool, or 0/1 of any dtype; numpy or torch) -> record bytes.

    Byte-identical to ``np.save`` of ``concat(uint16 header, np.packbits(events))`` as done for
    the released datasets.
    """
    ev = _to_numpy_bool(events)
    header = _shape_header(ev.shape)
    payload = np.packbits(ev.reshape(-1)).tobytes()
    return _npy_header(len(header) + len(payload)) + header + payload


def parse_record(data: bytes | bytearray | memoryview | np.ndarray, where: str = "record") -> ParsedRecord:
    """Validate one record and return its shape and packed payload (a view, no unpacking).

    Accepts any valid .npy encoding of a 1-D uint8 array (not only the exact header numpy
    writes today). Raises RecordError naming ``where`` on anything else.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    raw = buf.tobytes()[:10] if len(buf) >= 10 else buf.tobytes()
    if len(buf) < 10 or raw[:6] != _MAGIC:
        raise RecordError(f"{where}: not a .npy record (bad magic, {len(buf)} bytes)")
    major = raw[6]
    if major == 1:
        hlen, start = int.from_bytes(raw[8:10], "little"), 10
    elif major in (2, 3):
        if len(buf) < 12:
            raise RecordError(f"{where}: truncated .npy header")
        hlen, start = int.from_bytes(buf[8:12].tobytes(), "little"), 12
    else:
        raise RecordError(f"{where}: unsupported .npy format version {major}")
    if len(buf) < start + hlen:
        raise RecordError(f"{where}: truncated .npy header ({len(buf)} bytes, header needs {start + hlen})")
    try:
        meta = ast.literal_eval(buf[start : start + hlen].tobytes().decode("latin1"))
        descr, fortran, npy_shape = meta["descr"], meta["fortran_order"], tuple(meta["shape"])
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad record
        raise RecordError(f"{where}: unreadable .npy header ({exc})") from None
    if np.dtype(descr) != np.uint8 or len(npy_shape) != 1:
        raise RecordError(
            f"{where}: expected a 1-D uint8 array, got dtype {np.dtype(descr)} and shape {npy_shape}"
        )
    del fortran  # irrelevant for 1-D arrays
    body = buf[start + hlen :]
    (n,) = npy_shape
    if len(body) != n:
        raise RecordError(f"{where}: truncated record: .npy header says {n} bytes, file holds {len(body)}")
    if n < SHAPE_HEADER_BYTES:
        raise RecordError(f"{where}: record too short for the (T, C, H, W) header ({n} bytes)")
    shape = tuple(int(s) for s in body[:SHAPE_HEADER_BYTES].view("<u2"))
    expect = packed_size(shape)
    if n - SHAPE_HEADER_BYTES != expect:
        raise RecordError(
            f"{where}: header shape {shape} needs {expect} packed bytes, record holds {n - SHAPE_HEADER_BYTES}"
        )
    return ParsedRecord(shape=shape, payload=body[SHAPE_HEADER_BYTES:])  # type: ignore[arg-type]


def decode_record(data, where: str = "record", shape: Sequence[int] | None = None) -> np.ndarray:
    """Record bytes -> events np.ndarray[bool] (T, C, H, W). ``shape`` checks the header."""
    rec = parse_record(data, where)
    if shape is not None and tuple(shape) != rec.shape:
        raise RecordError(f"{where}: header shape {rec.shape} does not match the expected {tuple(shape)}")
    count = int(np.prod(rec.shape))
    return np.unpackbits(rec.payload, count=count).astype(np.bool_).reshape(rec.shape)


def packed_payloads(
    records: Sequence[bytes] | Iterable[bytes],
    shape: Sequence[int],
    where: Sequence[str] | None = None,
) -> np.ndarray:
    """Many records of one known shape -> packed payloads uint8 [B, packed_size(shape)].

    Records written by numpy's current writer share one prefix and are sliced directly;
    any other record is parsed in full, so a valid but differently padded .npy still works
    and an invalid one raises RecordError naming ``where[i]``.
    """
    shape = tuple(int(s) for s in shape)
    prefix = record_prefix(shape)
    plen, n = len(prefix), packed_size(shape)
    records = list(records)
    out = np.empty((len(records), n), dtype=np.uint8)
    for i, rec in enumerate(records):
        if len(rec) == plen + n and rec[:plen] == prefix:
            out[i] = np.frombuffer(rec, dtype=np.uint8, count=n, offset=plen)
        else:
            label = where[i] if where is not None else f"record {i}"
            parsed = parse_record(rec, label)
            if parsed.shape != shape:
                raise RecordError(f"{label}: header shape {parsed.shape} does not match the expected {shape}")
            out[i] = parsed.payload
    return out


def pack_events(events: torch.Tensor) -> torch.Tensor:
    """Binary events [T, B, C, H, W] (any device) -> packed payloads uint8 [B, packed_size].

    Per sample, identical to ``np.packbits`` of the (T, C, H, W) tensor (MSB first).
    """
    t, b = events.shape[:2]
    flat = events.transpose(0, 1).reshape(b, -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bits = flat.view(b, -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=events.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8) if b else flat.new_empty((0, 0))


def unpack_events(
    packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed payloads uint8 [B, N] -> events [T, B, C, H, W] of ``dtype`` on packed's device."""
    shape = tuple(int(s) for s in shape)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise RecordError(f"packed payloads must be uint8 [B, N], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_size(shape):
        raise RecordError(
            f"packed payloads hold {packed.shape[1]} bytes per sample, shape {shape} needs {packed_size(shape)}"
        )
    b = packed.shape[0]
    count = int(np.prod(shape))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [B, N, 8]
    bits = bits.view(b, -1)[:, :count].view(b, *shape)  # [B, T, C, H, W]
    return bits.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)  # [T, B, C, H, W]


def records_from_packed(packed: np.ndarray, shape: Sequence[int]) -> list[bytes]:
    """Packed payloads uint8 [B, N] -> record bytes (the same bytes as [`encode_record`][i2e_train.codec.encode_record])."""
    prefix = record_prefix(shape)
    return [prefix + row.tobytes() for row in packed]


def records_from_events(events: torch.Tensor) -> list[bytes]:
    """Events [T, B, C, H, W] (any device) -> B records, packed on the events' device."""
    t, _, c, h, w = events.shape
    packed = pack_events(events).cpu().numpy()
    return records_from_packed(packed, (t, c, h, w))


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def count_events(packed: np.ndarray) -> int:
    """Number of set bits (= events) in packed payloads."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum())


def save_npy(arr: np.ndarray) -> bytes:
    """np.save into bytes (used by tests and tools to cross-check the header writer)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
