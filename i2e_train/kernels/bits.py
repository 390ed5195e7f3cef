"""Bit masks from vector comparisons: small LLVM intrinsics that plain numba loops cannot express.

`event_bits` turns n (8 or 32) float32 comparisons into one n-bit word at once (on x86 a
mask move), in ``np.packbits`` bit order. Used by the packed converter kernel.
`spike_bits_32` / `bits_spikes_32` pack 32 float32 spikes (0.0 / 1.0) into one
32-bit word and back, in little bit order (element k of a byte is its bit k). Used by
`i2e_train.kernels.spikes`.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["event_bits", "event_bits_8", "event_bits_32", "spike_bits_32", "bits_spikes_32"]


def _splat(builder, value, n):
    """LLVM IR: an n-lane vector holding ``value`` in every lane."""
    vec = ir.VectorType(value.type, n)
    undef = ir.Constant(vec, None)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def event_bits(n):
    """Intrinsic ``f(vp, a, b, th, out, at_on, at_off)``: events of n (8 or 32) pixels as bits.

    d = vp.flat[b : b + n] - vp.flat[a : a + n] (float32), ON = d >= th, OFF = d <= -th: the same
    IEEE subtraction and ordered comparisons as the dense kernel, on one n-lane vector each. The n
    comparison results become an n-bit integer directly (an ``<n x i1>`` bitcast; on x86 a mask
    move), their lanes first reversed inside each byte so that the first pixel of a byte lands in
    its bit 7, as ``np.packbits``; the n/8 bytes are stored at ``out.flat[at_on]`` and
    ``out.flat[at_off]`` (little-endian byte order). No bounds checks: callers keep every index
    in range. vp and out must be C-contiguous (float32 / uint8).
    """

    @intrinsic
    def event_bits(typingctx, vp, a, b, th, out, at_on, at_off):
        if not (isinstance(vp, types.Array) and vp.dtype == types.float32 and vp.layout == "C"
                and isinstance(out, types.Array) and out.dtype == types.uint8 and out.layout == "C"
                and th == types.float32):  # fmt: skip
            return None
        sig = types.void(vp, a, b, th, out, at_on, at_off)

        def codegen(context, builder, sig, args):
            plane, off_a, off_b, thr, dst, on_at, off_at = args
            src = context.make_array(sig.args[0])(context, builder, plane).data
            dst = context.make_array(sig.args[4])(context, builder, dst).data
            lanes = ir.VectorType(ir.FloatType(), n)

            def load(offset):
                return builder.load(builder.bitcast(builder.gep(src, [offset]), lanes.as_pointer()), align=4)

            d = builder.fsub(load(off_b), load(off_a))
            order = [8 * g + 7 - k for g in range(n // 8) for k in range(8)]
            order = ir.Constant(ir.VectorType(ir.IntType(32), n), order)
            d = builder.shuffle_vector(d, ir.Constant(lanes, None), order)
            word = ir.IntType(n)
            on = builder.bitcast(builder.fcmp_ordered(">=", d, _splat(builder, thr, n)), word)
            off = builder.bitcast(builder.fcmp_ordered("<=", d, _splat(builder, builder.fneg(thr), n)), word)
            for bits, at in ((on, on_at), (off, off_at)):
                builder.store(bits, builder.bitcast(builder.gep(dst, [at]), word.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return event_bits


event_bits_8 = event_bits(8)
event_bits_32 = event_bits(32)


_ONE_F32_BITS = 0x3F800000  # the bit pattern of float32 1.0


def _is_array(t, dtype) -> bool:
    return isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C"


@intrinsic
def spike_bits_32(typingctx, xi, at, out, out_at):
    """Intrinsic ``valid = f(xi, at, out, out_at)``: 32 spikes into one 32-bit word.

    ``xi`` is the uint32 view of a float32 array; lanes ``xi.flat[at : at + 32]`` are compared as
    bit patterns: bit k of the word is ``lane k != +0.0`` and the word is stored at the 4 bytes
    ``out.flat[out_at : out_at + 4]`` (little-endian, so byte j holds lanes 8j..8j+7, bit k of
    the byte = lane 8j+k). Returns the mask of lanes that are exactly +0.0 or +1.0 (all ones when
    the 32 values are spikes; -0.0, NaN or any other value clears its bit). No bounds checks.
    """
    if not (_is_array(xi, types.uint32) and _is_array(out, types.uint8)):
        return None
    sig = types.uint32(xi, at, out, out_at)

    def codegen(context, builder, sig, args):
        src_arr, src_at, dst_arr, dst_at = args
        src = context.make_array(sig.args[0])(context, builder, src_arr).data
        dst = context.make_array(sig.args[2])(context, builder, dst_arr).data
        lanes = ir.VectorType(ir.IntType(32), 32)
        v = builder.load(builder.bitcast(builder.gep(src, [src_at]), lanes.as_pointer()), align=4)
        zero = ir.Constant(lanes, [0] * 32)
        one = ir.Constant(lanes, [_ONE_F32_BITS] * 32)
        word = ir.IntType(32)
        nonzero = builder.bitcast(builder.icmp_unsigned("!=", v, zero), word)
        builder.store(nonzero, builder.bitcast(builder.gep(dst, [dst_at]), word.as_pointer()), align=1)
        valid = builder.or_(builder.icmp_unsigned("==", v, zero), builder.icmp_unsigned("==", v, one))
        return builder.bitcast(valid, word)

    return sig, codegen


@intrinsic
def bits_spikes_32(typingctx, bits, at, out, out_at):
    """Intrinsic ``f(bits, at, out, out_at)``: the inverse of `spike_bits_32`.

    Reads the 32-bit word at bytes ``bits.flat[at : at + 4]`` (little-endian) and writes its 32
    bits as float32 0.0 / 1.0 to ``out.flat[out_at : out_at + 32]``. No bounds checks.
    """
    if not (_is_array(bits, types.uint8) and _is_array(out, types.float32)):
        return None
    sig = types.void(bits, at, out, out_at)

    def codegen(context, builder, sig, args):
        src_arr, src_at, dst_arr, dst_at = args
        src = context.make_array(sig.args[0])(context, builder, src_arr).data
        dst = context.make_array(sig.args[2])(context, builder, dst_arr).data
        word = ir.IntType(32)
        w = builder.load(builder.bitcast(builder.gep(src, [src_at]), word.as_pointer()), align=1)
        floats = ir.VectorType(ir.FloatType(), 32)
        vals = builder.uitofp(builder.bitcast(w, ir.VectorType(ir.IntType(1), 32)), floats)
        builder.store(vals, builder.bitcast(builder.gep(dst, [dst_at]), floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen
