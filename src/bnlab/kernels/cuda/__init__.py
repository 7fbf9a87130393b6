"""bnlab's CUDA kernels: Triton implementations of ``bnlab::batch_norm_forward`` and
``bnlab::batch_norm_backward`` (the semantics of the CPU operators, see TEAM/README).

Nothing here imports Triton or touches CUDA until asked: :func:`available` checks,
:func:`register` installs the kernels at the operators' CUDA dispatch key, and
:func:`forward` / :func:`backward` import the kernels on first call. Under
``TRITON_INTERPRET=1`` (set before Triton is imported) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

__all__ = ["available", "backward", "flush_reports", "forward", "interpreted", "register"]

_LIBRARIES: dict = {}  # (namespace, dispatch key) -> torch.library.Library


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: The oldest Triton the kernels run on (pyproject's ``cuda`` extra). Older CUDA builds of
#: torch ship an older Triton (torch 2.6: 3.2, whose interpreter fails on these kernels); there
#: bnlab's CUDA inputs take torch's native kernel instead (with bnlab's checks).
MIN_TRITON = (3, 6)


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's (major, minor), from its metadata (Triton is not imported)."""
    if importlib.util.find_spec("triton") is None:
        return None
    for distribution in ("triton", "pytorch-triton"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return MIN_TRITON  # importable but without metadata (a source checkout): assume recent


def available() -> bool:
    """Whether the kernels can run here: Triton >= MIN_TRITON installed and a CUDA device (or
    the interpreter)."""
    version = triton_version()
    if version is None or version < MIN_TRITON:
        return False
    if interpreted():
        return True
    import torch

    return torch.cuda.is_available()


def forward(*args, **kwargs):
    """``bnlab::batch_norm_forward`` on Triton: ``(out, shift, mean_d, invstd, bad)``."""
    from bnlab.kernels.cuda import ops

    return ops.forward(*args, **kwargs)


def backward(*args, **kwargs):
    """``bnlab::batch_norm_backward`` on Triton: ``(grad_input, grad_weight, grad_bias,
    grad_residual)``."""
    from bnlab.kernels.cuda import ops

    return ops.backward(*args, **kwargs)


def flush_reports() -> None:
    """Issue the deferred non-finite warnings now (waits for their device copies)."""
    from bnlab.kernels.cuda import report

    report.flush()


def _forward_impl(input, weight, bias, residual, running_mean, running_var, training,
                  momentum, eps, activation, nonfinite, report):  # fmt: skip
    return forward(input, weight, bias, residual, running_mean, running_var, training,
                   momentum, eps, activation, nonfinite, report)  # fmt: skip


def _backward_impl(grad_out, input, weight, output, shift, mean_d, invstd, training,
                   activation, output_mask):  # fmt: skip
    return backward(grad_out, input, weight, output, shift, mean_d, invstd, training,
                    activation, list(output_mask))  # fmt: skip


def registered(namespace: str = "bnlab", dispatch_key: str = "CUDA") -> bool:
    return (namespace, dispatch_key) in _LIBRARIES


def register(namespace: str = "bnlab", dispatch_key: str = "CUDA") -> bool:
    """Register the kernels for ``<namespace>::batch_norm_forward`` / ``_backward`` (schemas
    as in TEAM/README) at ``dispatch_key``. Idempotent; False (nothing done) if the operators
    are not defined yet or the kernels cannot run here. (Tests use another namespace and the
    CPU key under the interpreter.)"""
    if (namespace, dispatch_key) in _LIBRARIES:
        return True
    if not available():
        return False
    import torch

    try:
        ops = getattr(torch.ops, namespace)
        ops.batch_norm_forward  # noqa: B018  (defined by bnlab's C++ extension)
        ops.batch_norm_backward  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    library = torch.library.Library(namespace, "IMPL")
    try:
        library.impl("batch_norm_forward", _forward_impl, dispatch_key)
        library.impl("batch_norm_backward", _backward_impl, dispatch_key)
    except RuntimeError as error:  # another kernel already registered for that key
        import warnings

        warnings.warn(f"bnlab.kernels.cuda.register: {error}", RuntimeWarning, stacklevel=2)
        return False
    _LIBRARIES[(namespace, dispatch_key)] = library
    return True
