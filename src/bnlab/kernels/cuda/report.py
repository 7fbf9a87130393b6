"""Reporting non-finite batch statistics without stalling the GPU.

The running statistics are already guarded on the device (``nonfinite`` 1 = skip the bad
channels, 2 = change nothing); what remains is telling the user, which needs ``bad`` on the
host. Reading it at once would be a host sync per BN layer per step, so:

* ``skip`` (1): ``bad`` is copied asynchronously into pinned memory with an event behind it;
  the warning is issued by a later call (:func:`poll`, run at every report and by
  :func:`flush`) once the copy has landed. The warning is *deferred*, never lost:
  :func:`flush` (also registered ``atexit``) waits for all pending copies.
* ``raise`` (2): the caller asked for an exception at the offending call, so this one
  synchronizes and raises ``FloatingPointError`` there (the cost of choosing 'raise').

CPU tensors (the interpreter) are checked at once.
"""

from __future__ import annotations

import atexit
import warnings
from collections import deque

import torch
from torch import Tensor

_PENDING: deque = deque()  # (event, pinned host copy of bad)
MAX_PENDING = 64  # beyond this many unchecked copies, wait for the oldest


def _message(bad_mask: Tensor, raising: bool) -> str:
    bad = bad_mask.nonzero().flatten().tolist()
    channels = f"{bad[:10]}{'...' if len(bad) > 10 else ''}"
    if raising:
        return (
            f"batch_norm: non-finite batch statistics in channel(s) {channels}; running "
            "statistics left unchanged (nonfinite='raise')"
        )
    return (
        f"batch_norm: non-finite batch statistics in channel(s) {channels}; their running "
        "statistics were not updated"
    )


def _warn(host_bad: Tensor) -> None:
    if bool(host_bad.any()):
        warnings.warn(_message(host_bad, False), RuntimeWarning, stacklevel=3)


def poll(wait: bool = False) -> None:
    """Warn for every pending ``bad`` copy that has landed (all of them if ``wait``)."""
    while _PENDING:
        event, host_bad = _PENDING[0]
        if not wait and not event.query():
            break
        event.synchronize()
        _PENDING.popleft()
        _warn(host_bad)


def flush() -> None:
    """Wait for every pending copy and issue its warning now."""
    poll(wait=True)


def report(bad: Tensor, policy: int) -> None:
    """Report ``bad`` (C,) bool per ``policy``: 1 warns (deferred on CUDA), 2 raises now."""
    if policy == 2:
        host = bad.cpu()  # a sync: 'raise' must raise at the offending call
        if bool(host.any()):
            raise FloatingPointError(_message(host, True))
        return
    if bad.device.type != "cuda":
        _warn(bad)
        return
    poll()
    if len(_PENDING) >= MAX_PENDING:
        _PENDING[0][0].synchronize()
        poll()
    host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
    host.copy_(bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((event, host))


atexit.register(flush)
