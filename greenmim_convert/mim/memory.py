"""Keeping freed memory in the process (glibc's ``mallopt``), and counting minor page faults."""

from __future__ import annotations

import ctypes
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
INT_MAX = 2**31 - 1


def tune_malloc() -> Optional[str]:
    """Keep freed memory in the process on Linux glibc; returns what was set, or None where it does not apply.

    glibc serves large blocks with fresh ``mmap``s and returns them on free, and trims the heap top: a training
    step frees its activations and the next step page-faults them back. With no ``mmap``-served blocks and no
    trimming, freed blocks stay on the heap's free lists and are reused; the process keeps its peak heap, as a
    caching allocator does.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, INT_MAX)):
        return None
    return f"glibc {version().decode()}: mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD={INT_MAX}"


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
