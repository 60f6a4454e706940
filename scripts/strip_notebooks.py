"""Strip outputs, execution counts and run-time metadata from notebooks (they are committed without outputs).

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py --check         # exit 1 and list notebooks that still carry outputs
    python scripts/strip_notebooks.py path/to/a.ipynb

Cell tags (e.g. `parameters`) and cell ids are kept, so papermill-style runs and diffs stay stable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# cell metadata written by Jupyter/nbclient while running; everything else (tags, …) is kept
RUNTIME_CELL_KEYS = ("execution", "collapsed", "scrolled", "ExecuteTime")
RUNTIME_NB_KEYS = ("widgets", "papermill")


def is_stripped(nb) -> bool:
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            return False
        if any(k in cell.get("metadata", {}) for k in RUNTIME_CELL_KEYS):
            return False
    return not any(k in nb.metadata for k in RUNTIME_NB_KEYS)


def strip(nb):
    """Remove outputs and run-time metadata in place; returns nb."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for k in RUNTIME_CELL_KEYS:
            cell.get("metadata", {}).pop(k, None)
    for k in RUNTIME_NB_KEYS:
        nb.metadata.pop(k, None)
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    p.add_argument("--check", action="store_true", help="only report notebooks with outputs (exit 1 if any)")
    args = p.parse_args(argv)
    paths = [Path(n) for n in args.notebooks] or sorted((REPO / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if is_stripped(nb):
            continue
        dirty.append(path)
        if not args.check:
            nbformat.write(strip(nb), path)
            print(f"stripped {path}")
    if args.check and dirty:
        print("notebooks with outputs (run scripts/strip_notebooks.py):", *map(str, dirty), sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
