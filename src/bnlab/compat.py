"""What the installed torch can do, detected by feature rather than by version string.

bnlab supports a range of torch releases (pyproject.toml; the tested range is in the README).
Where torch changed behaviour between releases, bnlab follows the installed one; each flag
here names one such change and is computed once, at import.
"""

from __future__ import annotations

import inspect

from torch import nn


def _accepts(cls: type, argument: str) -> bool:
    return argument in inspect.signature(cls.__init__).parameters


#: torch's BatchNorm takes ``bias=`` (keyword-only, default True) and prints ``bias=...`` in
#: its repr; older releases have neither.
TORCH_BN_HAS_BIAS: bool = _accepts(nn.BatchNorm2d, "bias")
