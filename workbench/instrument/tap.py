"""The tap: an identity module placed at a named site of the forward pass.

Because it is an `nn.Module`, a tap is reachable by our hook context managers, by nnsight, and by
plain `register_forward_hook`; a forward hook that returns a tensor replaces the value (write
interventions). With no hooks attached a tap returns its input object unchanged, so taps are
bitwise no-ops (tests/test_hooks.py proves it).
"""

from __future__ import annotations

import torch
from torch import nn


class Tap(nn.Module):
    """Identity at a named site. `site` is the vocabulary name (see `sites.py`), set on construction."""

    def __init__(self, site: str):
        super().__init__()
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"site={self.site!r}"
