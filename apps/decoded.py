"""Decompressed attention arrays kept in memory for the Entropy explorer's view switches.

Switching the head or statistic of an entropy profile recomputes it from the whole run; on a 1M-token
run most of that time is decompressing the same chunks again.  `decoded(run, layers)` returns a view
of the run (a `probes.StoreView`) whose entropy / entropy_no_temp / n_keys rows of those layers and
the positions are read once and kept, so the next switch is numpy only.  Kept only while they fit
BUDGET_BYTES, for the two most recently used runs; otherwise the plain run streams as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from probes import StoreView

BUDGET_BYTES = 256 << 20
CACHED = ("attention/entropy", "attention/entropy_no_temp", "attention/n_keys", "positions")
_LOCK = threading.Lock()
_RUNS: OrderedDict = OrderedDict()


class _Rows:
    """One array, whole rows (a layer's [head, token] or [token]) decompressed on first use."""

    def __init__(self, arr, n_tokens: int):
        self.arr, self.n = arr, n_tokens
        self.shape = arr.shape[:-1] + (n_tokens,)
        self.rows: dict = {}

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(self.shape) == 1:                       # positions: the whole committed array
            if None not in self.rows:
                self.rows[None] = np.asarray(self.arr[:self.n])
            return self.rows[None][key]
        layer = int(key[0])
        if layer not in self.rows:
            self.rows[layer] = np.asarray(self.arr[layer, ..., :self.n])
        return self.rows[layer][key[1:]]


class DecodedRun(StoreView):
    def __init__(self, run):
        super().__init__(run)
        self._arrays: dict = {}

    def __getitem__(self, name: str):
        if name not in CACHED:
            return super().__getitem__(name)
        if name not in self._arrays:
            self._arrays[name] = _Rows(super().__getitem__(name), self.n_tokens)
        return self._arrays[name]


def decoded(run, layers) -> StoreView | object:
    """A caching view of `run` when the rows of `layers` fit the budget, else `run` itself."""
    ent = run.array("attention/entropy")
    n_heads = ent.shape[1]
    need = len(set(layers)) * run.n_tokens * 4 * (2 * n_heads + 1) + run.n_tokens * 4
    if need > BUDGET_BYTES:
        return run
    key = (str(run.path), run.n_tokens)
    with _LOCK:
        if key not in _RUNS:
            _RUNS[key] = DecodedRun(run)
            while len(_RUNS) > 2:
                _RUNS.popitem(last=False)
        _RUNS.move_to_end(key)
        return _RUNS[key]
