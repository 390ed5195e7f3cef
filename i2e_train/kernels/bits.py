"""Bit masks from vector comparisons: a small LLVM intrinsic that plain numba loops cannot express.

:func:`event_bits` turns n (8 or 32) float32 comparisons into one n-bit word at once (on x86 a
mask move), in ``np.packbits`` bit order. Used by the packed converter kernel.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["event_bits", "event_bits_8", "event_bits_32"]


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
