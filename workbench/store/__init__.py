"""Zarr v3 run store: per-token recordings of a forward pass, appended document by document.

    RunWriter.create(path, attrs=..., layout=...)  -> writer; .append(doc), .flush(), .finish()
    RunWriter.open_append(path)                    -> resume an interrupted or finished run
    open_run(path)                                 -> Run: lazy .read(name, doc=, layer=), .to_xarray()
    list_runs(runs_dir)                            -> summaries from metadata only

The array vocabulary lives in schema.py; the format is documented in docs/store.md.
"""

from workbench.store.reader import Run, list_runs, open_run
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
    "Run",
    "RunWriter",
    "StoreError",
    "chain_input_hash",
    "config_hash",
    "list_runs",
    "open_run",
]
