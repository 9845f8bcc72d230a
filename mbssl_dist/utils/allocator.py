"""Host allocator settings for training.

glibc serves every block above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB on 64-bit) with a fresh ``mmap`` and returns it to the kernel on ``free``. A training
step allocates many large temporaries (per-task gradients, the reverse pass's buffers,
HMG's products), so on large graphs each of them page-faults its memory in again, every
step. :func:`keep_freed_memory` makes glibc take such blocks from the heap and keep freed
heap memory, so a step reuses the pages of the previous one (README "Sampled negatives for
large graphs" has the A/B).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """``mallopt(M_MMAP_MAX, 0)`` (large blocks from the heap) and ``mallopt(M_TRIM_THRESHOLD,
    INT_MAX)`` (freed heap memory is kept for reuse, not trimmed). Affects the allocations made
    after the call, in this process. Peak RSS stays about the same (the heap holds what the
    step needed at most); memory freed after the peak is not returned to the system until the
    process exits. Returns False (and changes nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator is left as it is")
        return False
    version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    log.debug("glibc %s: large blocks from the heap, freed memory kept (%s)", version().decode(),
              "set" if ok else "mallopt refused")
    return ok
