"""bnlab's fused CPU kernels: a C++ extension compiled on first use and cached on disk.

Three entry points (see ``batchnorm.cpp``): ``forward_train``, ``forward_eval`` and
``backward``, multi-threaded with torch's intra-op thread pool (so they honour
``torch.get_num_threads()``), for contiguous and channels_last float32/float64/float16/
bfloat16 tensors. If the extension cannot be built, bnlab warns once and uses its level-2
torch path. ``BNLAB_KERNELS=0`` disables the kernels; ``BNLAB_CACHE_DIR`` moves the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

_SOURCE = Path(__file__).with_name("batchnorm.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]  # -fopenmp: at::parallel_for
_LOCK = threading.Lock()
_state: dict = {"module": None, "error": None, "load_seconds": None}

HUGE_ALLOCATION_BYTES = 1 << 20  # outputs at least this large are allocated through NumPy


def _cpu_signature() -> str:
    """Identifies the instruction set the build targets (``-march=native``)."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def build_key() -> str:
    """Cache key: the source, the flags, torch, Python and the CPU's instruction set."""
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_signature().encode()):  # fmt: skip
        digest.update(part)
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("BNLAB_CACHE_DIR") or Path.home() / ".cache" / "bnlab"
    return Path(root) / "kernels" / build_key()


_ENABLED = os.environ.get("BNLAB_KERNELS", "1") != "0"


def enabled() -> bool:
    """Whether bnlab.functional may use the kernels (``BNLAB_KERNELS=0`` at start-up: no)."""
    return _ENABLED


def set_enabled(flag: bool) -> None:
    """Switch the kernels on or off for this process (tests compare both paths)."""
    global _ENABLED
    _ENABLED = bool(flag)


def load() -> ModuleType | None:
    """The compiled extension (building it on first use), or None if it cannot be built."""
    if _state["module"] is not None or _state["error"] is not None:
        return _state["module"]
    with _LOCK:
        if _state["module"] is not None or _state["error"] is not None:
            return _state["module"]
        started = time.perf_counter()
        try:
            _state["module"] = _build()
        except Exception as error:  # no compiler, no headers, ...: fall back, say why once
            _state["error"] = error
            warnings.warn(
                f"bnlab: fused CPU kernels unavailable ({type(error).__name__}: {error}); "
                "using the level-2 torch path",
                RuntimeWarning,
                stacklevel=2,
            )
        _state["load_seconds"] = time.perf_counter() - started
    return _state["module"]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    try:
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / "build.json"
    if not record.exists():
        print(
            f"bnlab: compiling the fused CPU kernels into {directory} (once per machine, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    started = time.perf_counter()
    module = cpp_extension.load(
        name=f"bnlab_kernels_{build_key()}",
        sources=[str(_SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch has loaded (same SONAME)
        build_directory=str(directory),
        verbose=False,
    )
    if not record.exists():
        seconds = time.perf_counter() - started
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"compile_seconds": seconds, "flags": _FLAGS}))
        os.replace(tmp, record)
    return module


def compile_seconds() -> float | None:
    """How long the first (compiling) load took, as recorded in the cache."""
    try:
        return json.loads((cache_dir() / "build.json").read_text())["compile_seconds"]
    except (OSError, ValueError, KeyError):
        return None


def load_seconds() -> float | None:
    """How long this process took to load (or build) the extension."""
    return _state["load_seconds"]


def usable(input: torch.Tensor) -> bool:
    """Whether the fused kernels are enabled, built and handle this input."""
    return _ENABLED and supports(input) and (_state["module"] is not None or load() is not None)


def supports(input: torch.Tensor) -> bool:
    """Whether the fused kernels handle this input (device, dtype, layout)."""
    if input.device.type != "cpu" or input.dtype not in _DTYPES or input.numel() == 0:
        return False
    if input.is_contiguous():
        return True
    if input.dim() == 4:
        return input.is_contiguous(memory_format=torch.channels_last)
    if input.dim() == 5:
        return input.is_contiguous(memory_format=torch.channels_last_3d)
    return False


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s memory layout (contiguous or channels_last), copying if needed."""
    if t.stride() == like.stride():
        return t
    if like.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


class BufferPool:
    """Reuses large output buffers, as a caching allocator does.

    A fresh 50 MB tensor costs page faults and zeroing on every training step, more than the
    normalization's arithmetic on this class of machine. Buffers are allocated through NumPy
    (which asks for transparent huge pages) and handed out as views; when the last tensor
    using a view is freed, a finalizer returns the buffer to the idle list for the next
    output of the same size. At most ``max_idle_bytes`` of idle buffers are kept, oldest
    dropped first (``BNLAB_POOL_MB``, default 1024; 0 disables the pool).
    """

    def __init__(self, max_idle_bytes: int) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[np.ndarray] = []
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes``, reused when an idle one of that size exists."""
        with self._lock:
            index = next((i for i, b in enumerate(self._idle) if b.nbytes == nbytes), None)
            base = self._idle.pop(index) if index is not None else np.empty(nbytes, np.uint8)
        view = base[:]
        weakref.finalize(view, self._release, base)
        return view

    def _release(self, base: np.ndarray) -> None:
        with self._lock:
            self._idle.append(base)
            while self._idle and self.idle_bytes > self.max_idle_bytes:
                self._idle.pop(0)

    @property
    def idle_bytes(self) -> int:
        return sum(b.nbytes for b in self._idle)

    def clear(self) -> None:
        """Forget every idle buffer (their memory goes back to the system)."""
        with self._lock:
            self._idle = []


POOL = BufferPool(int(os.environ.get("BNLAB_POOL_MB", "1024")) << 20)


def empty_like(input: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor with ``input``'s shape, dtype and strides.

    Outputs of at least ``HUGE_ALLOCATION_BYTES`` come from :data:`POOL`.
    """
    nbytes = input.numel() * input.element_size()
    if nbytes < HUGE_ALLOCATION_BYTES:
        return torch.empty_like(input)
    storage = torch.from_numpy(POOL.take(nbytes)).untyped_storage()
    # set_ (not a view): autograd then keeps such a gradient instead of copying it.
    return torch.empty(0, dtype=input.dtype).set_(storage, 0, input.shape, input.stride())
