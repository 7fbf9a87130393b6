"""bnlab's batch-norm operators: ``torch.ops.bnlab.*``, with CPU kernels in C++.

The C++ extension (``cpu/``, compiled on first use by :mod:`bnlab.kernels.build`) registers
the operators ``bnlab::batch_norm_forward``, ``bnlab::batch_norm_backward`` and the autograd
operator ``bnlab::batch_norm`` (see ``cpu/ops.cpp``); :mod:`bnlab.kernels.fake` gives them
fake implementations for torch.compile and torch.export; :mod:`bnlab.kernels.composite`
implements the same operation in differentiable torch ops (the fallback without a compiler,
and the graph of the backward for double backward); :mod:`bnlab.kernels.function` joins
forward and backward in a Python ``autograd.Function`` for ``torch.func`` transforms.

If the extension cannot be built, bnlab warns once and uses the composite implementation.
``BNLAB_KERNELS=0`` disables the kernels; ``BNLAB_CACHE_DIR`` moves the build cache;
``BNLAB_POOL_MB`` caps the idle memory of the output pool (``cpu/pool.h``).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from types import ModuleType

import torch

from bnlab.kernels.build import build_key, cache_dir, compile_seconds

__all__ = [
    "build_key",
    "cache_dir",
    "compile_seconds",
    "enabled",
    "load",
    "load_seconds",
    "pool_stats",
    "ready",
    "release_pool",
    "set_enabled",
    "supports",
    "usable",
]

_LOCK = threading.Lock()
_state: dict = {"module": None, "error": None, "load_seconds": None}
_ENABLED = os.environ.get("BNLAB_KERNELS", "1") != "0"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OPS = None  # torch.ops.bnlab's overloads once loaded: batch_norm, batch_norm_forward, ...
EAGER = None  # eager CPU calls, entered directly (cpu/ops.cpp); None while disabled or unbuilt
MODULE_EAGER = None  # the same for bnlab's BatchNorm modules (their rules and checks in C++)
DEVICES = {"cpu"}  # device types with bnlab kernels ("cuda" once its kernels are registered)


def enabled() -> bool:
    """Whether bnlab.functional may use the kernels (``BNLAB_KERNELS=0`` at start-up: no)."""
    return _ENABLED


def set_enabled(flag: bool) -> None:
    """Switch the kernels on or off for this process (tests compare both paths)."""
    global _ENABLED
    _ENABLED = bool(flag)
    _set_eager()


def _set_eager() -> None:
    """EAGER and MODULE_EAGER follow the switch and the build: the extension's entries, or None."""
    global EAGER, MODULE_EAGER
    module = _state["module"] if _ENABLED else None
    EAGER = module.eager if module is not None else None
    MODULE_EAGER = module.module_eager if module is not None else None


def load() -> ModuleType | None:
    """The compiled extension (building it on first use), or None if it cannot be built.

    Loading it registers the ``torch.ops.bnlab`` operators and their fake implementations.
    """
    if _state["module"] is not None or _state["error"] is not None:
        return _state["module"]
    with _LOCK:
        if _state["module"] is not None or _state["error"] is not None:
            return _state["module"]
        started = time.perf_counter()
        try:
            from bnlab.kernels import build

            module = build.build()
            from bnlab.kernels import composite, fake  # register the Python parts

            fake.register()
            composite.register()
            _register_cuda()
            global OPS
            OPS = _Overloads()
            _state["module"] = module
            _set_eager()
        except Exception as error:  # no compiler, no headers, ...: fall back, say why once
            _state["error"] = error
            warnings.warn(
                f"bnlab: fused CPU kernels unavailable ({type(error).__name__}: {error}); "
                "using the composite torch implementation",
                RuntimeWarning,
                stacklevel=2,
            )
        _state["load_seconds"] = time.perf_counter() - started
    return _state["module"]


class _Overloads:
    """The operators' default overloads, looked up once (each lookup costs microseconds)."""

    def __init__(self) -> None:
        namespace = torch.ops.bnlab
        self.batch_norm = namespace.batch_norm.default
        self.batch_norm_forward = namespace.batch_norm_forward.default
        self.batch_norm_backward = namespace.batch_norm_backward.default


def _register_cuda() -> None:
    """Install the Triton kernels at the operators' CUDA key where a GPU and Triton exist.

    A failure here costs only the CUDA kernels (torch's native kernel serves CUDA tensors);
    the CPU kernels stay."""
    if not torch.cuda.is_available():
        return
    try:
        from bnlab.kernels import cuda

        if cuda.register():
            DEVICES.add("cuda")
    except Exception as error:  # a broken Triton install, ...: say why once, keep the CPU kernels
        warnings.warn(
            f"bnlab: CUDA kernels unavailable ({type(error).__name__}: {error}); CUDA tensors use "
            "torch's native batch norm",
            RuntimeWarning,
            stacklevel=3,
        )


def load_seconds() -> float | None:
    """How long this process took to load (or build) the extension."""
    return _state["load_seconds"]


def supports(input: torch.Tensor) -> bool:
    """Whether bnlab has kernels for this input (device and dtype; any layout). A CUDA input
    loads the extension first if nothing has yet (loading registers the CUDA kernels): a
    process that calls ``bnlab.functional`` on CUDA tensors alone gets them too."""
    device = input.device.type
    unloaded = _state["module"] is None and _state["error"] is None  # (a failed build: not again)
    if device == "cuda" and device not in DEVICES and _ENABLED and unloaded:
        load()
    return device in DEVICES and input.dtype in _DTYPES


def ready() -> bool:
    """Whether the kernels are enabled and built (building them on first use)."""
    return _ENABLED and (_state["module"] is not None or load() is not None)


def usable(input: torch.Tensor) -> bool:
    """Whether the kernels are enabled, built and handle this input."""
    return supports(input) and ready()


def pool_stats() -> dict[str, int]:
    """The output pool: idle bytes and blocks, the idle cap, allocations reused and new."""
    module = load()
    if module is None:
        return {"idle_bytes": 0, "idle_blocks": 0, "max_idle_bytes": 0, "hits": 0, "misses": 0}
    keys = ("idle_bytes", "idle_blocks", "max_idle_bytes", "hits", "misses")
    return dict(zip(keys, module.pool_stats(), strict=True))


def release_pool() -> None:
    """Give the pool's idle memory back to the system."""
    module = load()
    if module is not None:
        module.pool_release()
