"""Analysis probes: one question per module, numpy/pandas/plotly only (no torch).

    probes/
      routing.py          MoE routing metrics: load balance, OLMoE specialization/saturation,
                          Mixtral consecutive-token rates, cross-layer transitions (science §1)
      routing_figures.py  plotly builders for the routing metrics
      entropy.py          attention entropy: normalised/KL, ΔH from temperature, collapsed heads,
                          binned position profiles, figures (science §2.1)
      temperature.py      Llama 4 / Qwen logn / YaRN / SSMax closed forms and figures (science §2.3–2.4)

Each module has array-level functions (numpy in, numpy/pandas out) and store-level wrappers that
take a run: a `zarr.Group` of the run store, a `workbench.store.Run`, or any object whose
`__getitem__` returns sliceable arrays and which has `.attrs`.  Wrappers stream over token chunks
with bounded memory and see only committed data (attrs `n_tokens` / `n_docs`, docs/store.md).

A dataset of many runs from `workbench.store.open_dataset` (dask-backed xarray) is accepted by the
store-level metrics too: `dask_path` sends it to the module's dask twin (routing_dask.py,
entropy_dask.py), which computes the same numbers as distributed reductions.

Submodules are not imported here so that `import probes` stays cheap; import what you use.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["StoreView", "as_store", "dask_path", "is_dataset", "token_chunks"]


class StoreView:
    """Uniform read access to a run: `view[name]`, `name in view`, `.attrs`, and the committed
    `n_tokens` / `n_docs` (arrays may be allocated past them by an interrupted writer).

    run: zarr.Group / mapping of array paths, or an object with `.array(name)` and `.has(name)`
    (`workbench.store.Run`).
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.attrs: dict = dict(getattr(run, "attrs", None) or {})
        self._by_method = callable(getattr(run, "array", None)) and callable(getattr(run, "has", None))

    def __getitem__(self, name: str):
        return self.run.array(name) if self._by_method else self.run[name]

    def __contains__(self, name: str) -> bool:
        if self._by_method:
            return bool(self.run.has(name))
        try:
            return name in self.run
        except TypeError:  # objects without __contains__
            try:
                self.run[name]
            except KeyError:
                return False
            return True

    @property
    def n_tokens(self) -> int:
        if "n_tokens" in self.attrs:
            return int(self.attrs["n_tokens"])
        for name, axis in (("tokens", 0), ("router/experts", 1), ("attention/entropy", 2)):
            if name in self:
                return int(self[name].shape[axis])
        raise KeyError("run has no n_tokens attribute and no tokens/router/attention arrays")

    @property
    def n_docs(self) -> int:
        if "n_docs" in self.attrs:
            return int(self.attrs["n_docs"])
        return int(self["doc_offsets"].shape[0]) - 1 if "doc_offsets" in self else 1

    @property
    def config(self) -> dict:
        return dict(self.attrs.get("config") or {})

    @property
    def layout(self) -> dict:
        return dict(self.attrs.get("layout") or {})


def as_store(run: Any) -> StoreView:
    """Wrap a run (see StoreView) once; passing a StoreView returns it unchanged."""
    return run if isinstance(run, StoreView) else StoreView(run)


def token_chunks(n_tokens: int, chunk_tokens: int) -> Iterator[tuple[int, int]]:
    """Half-open token ranges [t0, t1) of at most `chunk_tokens` covering 0..n_tokens."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    for t0 in range(0, n_tokens, chunk_tokens):
        yield t0, min(n_tokens, t0 + chunk_tokens)


def is_dataset(run: Any) -> bool:
    """True for a dataset of runs from `workbench.store.open_dataset`, or an object wrapping one in
    `.dataset` (`workbench.store.RunSet`). Duck-typed: imports neither xarray nor dask."""
    ds = getattr(run, "dataset", run)
    return (hasattr(ds, "data_vars") and "runs" in (getattr(ds, "attrs", None) or {})
            and "doc" in getattr(ds, "coords", {}))


def dask_path(module: str):
    """Decorator for a store-level metric: given an `open_dataset` dataset, call the function of the
    same name in `probes.<module>` (its dask implementation) on it instead of the chunk loop."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(run, *args, **kwargs):
            if is_dataset(run):
                twin = getattr(importlib.import_module(f"probes.{module}"), fn.__name__)
                return twin(getattr(run, "dataset", run), *args, **kwargs)
            return fn(run, *args, **kwargs)
        return inner
    return wrap
