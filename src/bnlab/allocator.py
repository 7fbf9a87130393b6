"""glibc allocator tuning for large tensors.

By default glibc serves allocations above 32 MB with fresh ``mmap``s and returns them on
``free``: every new large tensor pays page faults and zeroing. Raising the mmap and trim
thresholds keeps freed memory in the heap for reuse. glibc reads these variables when a
process starts, so they are set for a new process (``bnlab tuned -- python train.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

TUNED_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),  # serve allocations up to 4 GiB from the heap
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),  # and keep up to 4 GiB of freed heap for reuse
}


def tuned_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the tuning added."""
    return {**(os.environ if base is None else base), **TUNED_ENV}


def is_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in TUNED_ENV.items())


def exec_tuned(argv: Sequence[str]) -> None:
    """Replace this process with ``argv`` run under the tuned allocator."""
    if not argv:
        raise ValueError("argv: expected a command to run, got nothing")
    import shutil

    if shutil.which(argv[0]) is None:
        raise ValueError(f"argv: command not found: {argv[0]!r}")
    os.execvpe(argv[0], list(argv), tuned_environ())
