"""What every compiled kernel shares: numba options, the float32 type, the thread count."""

from __future__ import annotations

import numba
import numpy as np

_F32 = np.float32
# Every kernel: cached on disk, no bounds checks, and ``error_model='numpy'`` so that a division
# has no Python zero check. No fast-math, no contraction into FMA: IEEE float32 results.
JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}


def use_threads(n: int) -> None:
    """Run the kernels on ``n`` threads, the caller's (torch's) thread count.

    numba's OpenMP layer and torch share one libgomp, so the count is only ever set to the value
    torch already uses (never lowered below it, which would slow torch down too).
    """
    n = int(n)
    if 1 <= n <= numba.config.NUMBA_NUM_THREADS and numba.get_num_threads() != n:
        numba.set_num_threads(n)
