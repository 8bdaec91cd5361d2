"""What a measurement ran on: recorded beside every CPU timing (CPUs differ between machines)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned: bool | None = None


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``limit_bytes`` for reuse instead of
    returning them to the kernel.

    PyTorch's CPU allocator takes every tensor from ``malloc``; by default glibc serves blocks
    above 32 MiB with a fresh ``mmap`` and unmaps them on free, so each large activation of a
    sampling loop costs page faults on first touch (on the 2-core CI machine a quarter to a third
    of the sampling time of ``flux-fmnist`` at batch 64; see docs/quantization.md). Process-wide and
    idempotent; a no-op that returns False where the C library is not glibc.
    """
    global _tuned
    if _tuned is None:
        _tuned = False
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(limit_bytes))) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, min(2 * int(limit_bytes), 2**31 - 1)))
        except (OSError, AttributeError):
            pass
    return _tuned
