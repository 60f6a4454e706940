"""Zarr v3 run store: per-token recordings of a forward pass, appended document by document.

    RunWriter.create(path, attrs=..., layout=...)  -> writer; .append(doc), .flush(), .finish()
    RunWriter.open_append(path)                    -> resume an interrupted or finished run
    open_run(path)                                 -> Run: lazy .read(name, doc=, layer=), .to_xarray()
    list_runs(runs_dir)                            -> summaries from metadata only
    open_dataset(paths_or_glob, chunks=...)        -> many runs as one lazy dask-backed xarray.Dataset
    RunSet(paths_or_glob) / open_runs(...)         -> many runs behind the `Run` interface (the app)

The array vocabulary lives in schema.py; the format is documented in docs/store.md.
"""

from workbench.store.dataset import IncompleteRunWarning, open_dataset, resolve_runs
from workbench.store.reader import Run, list_runs, open_run
from workbench.store.runset import RunSet, open_runs
from workbench.store.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    ArraySpec,
    Layout,
    StoreError,
    chain_input_hash,
    config_hash,
)
from workbench.store.writer import RunWriter

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "ArraySpec",
    "Layout",
    "IncompleteRunWarning",
    "Run",
    "RunSet",
    "RunWriter",
    "StoreError",
    "chain_input_hash",
    "config_hash",
    "list_runs",
    "open_dataset",
    "open_run",
    "open_runs",
    "resolve_runs",
]
