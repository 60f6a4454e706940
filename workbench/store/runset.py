"""Several runs opened as one `Run`: `RunSet(paths_or_glob)` for code written against `open_run`.

The app's explorers and any other `Run` consumer (`read`, `doc_slice`, `array`, `has`, `layout`,
`attrs`, `n_tokens`, `n_docs`, `doc_offsets`) see the documents of every run one after another, in
the order `open_dataset` gives them. Arrays are the dataset's dask arrays, so `read` touches only the
chunks it needs, and the store-level probes route a RunSet to their dask twins (`probes.dask_path`)
through its `.dataset`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.store.dataset import open_dataset
from workbench.store.reader import Run
from workbench.store.schema import SCHEMA, TOKEN, Layout


class RunSet(Run):
    """Runs concatenated along `token` (see `open_dataset` for the arguments and the checks)."""

    def __init__(self, paths_or_glob, chunks=None, *, include_incomplete: bool = False):
        self.dataset = ds = open_dataset(paths_or_glob, chunks, include_incomplete=include_incomplete)
        self.paths = [Path(p) for p in ds.attrs["runs"]]
        first = self.paths[0]
        # a stable name for caches and titles: the runs' names joined (one directory: the common parent)
        self.path = first.parent / "+".join(p.name for p in self.paths)
        self.attrs = dict(ds.attrs)
        self.layout = Layout.from_dict(ds.attrs["layout"])
        self.n_docs, self.n_tokens = int(ds.attrs["n_docs"]), int(ds.attrs["n_tokens"])
        self.doc_offsets = np.asarray(ds["doc_offsets"].values, dtype=np.int64)
        self._group = None
        self._arrays = {n: ds[n].data for n in SCHEMA if TOKEN in SCHEMA[n].dims and n in ds}
        self._arrays.update({"doc_offsets": self.doc_offsets, "doc_id": ds["document_id"].values,
                             "doc_domain": ds["doc_domain"].values})
        if "moe_layer" in ds.coords and self.layout.groups and "router/experts" in ds:
            self._arrays["router/layer_index"] = np.asarray(ds["moe_layer"].values, dtype=np.int32)

    def __repr__(self) -> str:
        return (f"RunSet({len(self.paths)} runs: {[str(p) for p in self.paths]}, n_docs={self.n_docs}, "
                f"n_tokens={self.n_tokens}, groups={list(self.layout.groups)})")

    def run_of_doc(self, i: int) -> Path:
        """The run that holds document i."""
        self.doc_slice(i)  # range check with Run's message
        return self.paths[int(self.dataset["doc_run"].values[i % self.n_docs])]

    def to_xarray(self, group: str | None = None):
        """The `open_dataset` Dataset (group=None), or its variables of one group with plain names."""
        ds = self.dataset
        if group is None:
            return ds
        prefix = f"{group}/" if group else ""
        names = [v for v in ds.data_vars if (v.startswith(prefix) if prefix else "/" not in v)]
        out = ds[names]
        return out.rename({v: v[len(prefix):] for v in names}) if prefix else out


def open_runs(paths_or_glob, chunks=None, *, include_incomplete: bool = False) -> Run:
    """`open_run` for one run path, a `RunSet` for a glob, a directory of runs or a list."""
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, Path)) else list(paths_or_glob)
    if len(items) == 1 and not set("*?[") & set(str(items[0])) and (Path(items[0]) / "zarr.json").is_file():
        return Run(items[0])
    return RunSet(items, chunks, include_incomplete=include_incomplete)
