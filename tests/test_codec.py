"""The record codec: exact bytes of the released format, round trips and named errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from i2e_train.codec import (
    RecordError,
    decode_record,
    encode_record,
    pack_events,
    packed_payloads,
    packed_size,
    parse_record,
    record_prefix,
    record_size,
    unpack_events,
)


def released_record(events: np.ndarray) -> bytes:
    """How the released `data` field was made: np.save of uint16 header + np.packbits."""
    arr = np.concatenate([np.array(events.shape, dtype="<u2").view(np.uint8), np.packbits(events.reshape(-1))])
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(8, 2, 128, 128), (8, 2, 32, 32), (8, 2, 224, 224), (3, 1, 5, 7), (1, 1, 1, 1), (2, 2, 3, 3)])
def test_encode_is_byte_identical_to_released(shape, rng):
    ev = rng.random(shape) < 0.07
    rec = encode_record(ev)
    assert rec == released_record(ev)
    assert len(rec) == record_size(shape)
    assert rec.startswith(record_prefix(shape))


def test_documented_sizes_and_header():
    ev = np.zeros((8, 2, 128, 128), dtype=bool)
    ev[0, 0, 0, 0] = True
    rec = encode_record(ev)
    assert len(rec) == 32_904  # REFERENCE: a .npy of 32,904 bytes
    arr = np.load(io.BytesIO(rec))
    assert arr.dtype == np.uint8 and arr.shape == (32_776,)
    assert arr[:8].view("<u2").tolist() == [8, 2, 128, 128]
    assert arr[8] == 0b1000_0000  # big-endian bit order: first event is the MSB


def test_padding_bits_are_zero_for_odd_sizes():
    ev = np.ones((1, 1, 3, 3), dtype=bool)  # 9 events -> 2 bytes, 7 padding bits
    arr = np.load(io.BytesIO(encode_record(ev)))
    assert arr[8:].tolist() == [0xFF, 0x80]


@pytest.mark.parametrize("shape", [(8, 2, 16, 16), (3, 1, 5, 7)])
def test_decode_round_trip_and_released_records(shape, rng):
    ev = rng.random(shape) < 0.5
    assert np.array_equal(decode_record(encode_record(ev)), ev)
    assert np.array_equal(decode_record(released_record(ev)), ev)
    assert decode_record(encode_record(ev)).dtype == np.bool_


def test_encode_accepts_torch_and_binary_ints(rng):
    ev = rng.random((2, 2, 4, 4)) < 0.5
    assert encode_record(torch.from_numpy(ev)) == encode_record(ev.astype(np.float32)) == encode_record(ev)
    with pytest.raises(RecordError, match="binary"):
        encode_record(ev.astype(np.float32) * 2)


def test_batched_unpack_matches_decode(rng):
    shape = (8, 2, 9, 11)
    evs = [rng.random(shape) < 0.3 for _ in range(5)]
    packed = packed_payloads([encode_record(e) for e in evs], shape)
    assert packed.shape == (5, packed_size(shape))
    events = unpack_events(torch.from_numpy(packed), shape)
    assert events.shape == (8, 5, 2, 9, 11) and events.dtype == torch.float32 and events.is_contiguous()
    for i, e in enumerate(evs):
        assert torch.equal(events[:, i].bool(), torch.from_numpy(e))
    assert torch.equal(pack_events(events), torch.from_numpy(packed))
    assert unpack_events(torch.from_numpy(packed), shape, torch.bool).dtype == torch.bool


def test_packed_payloads_accepts_other_valid_npy_headers(rng):
    ev = rng.random((2, 1, 4, 4)) < 0.5
    arr = np.load(io.BytesIO(encode_record(ev)))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    out = packed_payloads([buf.getvalue()], ev.shape)
    assert np.array_equal(out[0], np.packbits(ev.reshape(-1)))


def test_errors_name_the_record(rng):
    ev = rng.random((2, 2, 8, 8)) < 0.5
    rec = encode_record(ev)
    with pytest.raises(RecordError, match="row 7.*truncated"):
        parse_record(rec[:-3], "row 7")
    with pytest.raises(RecordError, match="not a .npy"):
        decode_record(b"hello world, not numpy", "x.npy")
    with pytest.raises(RecordError, match="does not match the expected"):
        decode_record(rec, "r", shape=(2, 2, 8, 9))
    with pytest.raises(RecordError, match="uint8"):
        buf = io.BytesIO()
        np.save(buf, np.zeros(40, dtype=np.uint16))
        decode_record(buf.getvalue(), "r")
    # header says (2, 2, 8, 9) but the payload holds (2, 2, 8, 8)
    arr = np.load(io.BytesIO(rec)).copy()
    arr[:8] = np.array([2, 2, 8, 9], dtype="<u2").view(np.uint8)
    buf = io.BytesIO()
    np.save(buf, arr)
    with pytest.raises(RecordError, match=r"header shape \(2, 2, 8, 9\) needs"):
        parse_record(buf.getvalue(), "r")
    with pytest.raises(RecordError, match="record 1"):
        packed_payloads([rec, rec[:50]], (2, 2, 8, 8))
    with pytest.raises(RecordError, match="needs"):
        unpack_events(torch.zeros(2, 5, dtype=torch.uint8), (2, 2, 8, 8))
