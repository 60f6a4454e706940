"""Execute the notebooks top to bottom with nbclient and fail on any error (CI runs this on the tiny model).

    python scripts/run_notebooks.py                                     # every notebooks/*.ipynb, defaults
    python scripts/run_notebooks.py notebooks/21_needle.ipynb -p MODEL=tiny
    python scripts/run_notebooks.py notebooks/20_irope_entropy.ipynb \\
        -p MODEL=/ckpt/Llama-4-Scout-17B-16E -p DEVICE=cuda -p DTYPE=bf16 -o runs/executed

`-p KEY=VALUE` rewrites the line `KEY = ...` of the cell tagged `parameters` (papermill's convention;
the assignment is appended when the cell has none). VALUE is a Python literal (`8`, `[64, 128]`,
`None`, `"cuda"`) or, when it does not parse as one, a string (`-p DEVICE=cuda`). Executed copies (with
outputs) are written only with `-o DIR`; the notebooks in the repository stay stripped.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PARAMETERS_TAG = "parameters"


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: Python source of VALUE}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"parameter override {item!r} is not KEY=VALUE with KEY a Python name")
        try:
            ast.literal_eval(value)
            out[key] = value.strip()
        except (ValueError, SyntaxError):
            out[key] = repr(value)
    return out


def parameters_cell(nb):
    """The (first) code cell tagged `parameters`; KeyError when the notebook has none."""
    for cell in nb.cells:
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return cell
    raise KeyError("notebook has no code cell tagged 'parameters'")


def set_parameters(nb, overrides: dict[str, str]):
    """Rewrite `KEY = ...` lines of the parameters cell in place (append missing keys); returns nb."""
    if not overrides:
        return nb
    cell = parameters_cell(nb)
    lines = cell.source.splitlines()
    for key, value in overrides.items():
        new = f"{key} = {value}  # set by run_notebooks.py"
        pattern = re.compile(rf"^{re.escape(key)}\s*=(?!=)")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if hits:
            lines[hits[-1]] = new
        else:
            lines.append(new)
    cell.source = "\n".join(lines)
    return nb


def execute(path: str | Path, overrides: dict[str, str] | None = None, timeout: int = 300,
            kernel_name: str = "python3", threads: int | None = None):
    """Run one notebook in its own directory; returns (executed notebook, seconds).
    Raises nbclient's CellExecutionError (with the failing cell's traceback) on an error.

    threads: CPU threads of the kernel's torch (OMP_NUM_THREADS); None = the caller's OMP_NUM_THREADS,
    else 1. The tiny model gains nothing from more, and on a shared CI runner OpenMP threads that
    wait for busy cores make every small matmul 10-30x slower."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = set_parameters(nbformat.read(path, as_version=4), overrides or {})
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads) if threads else env.get("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    p.add_argument("-p", "--parameter", action="append", metavar="KEY=VALUE",
                   help="override a parameter of every notebook run (repeatable)")
    p.add_argument("-o", "--output-dir", help="write executed notebooks (with outputs) here")
    p.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell (default 300)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    p.add_argument("--threads", type=int, help="torch CPU threads in the kernel (default: $OMP_NUM_THREADS, else 1)")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.parameter)
    paths = [Path(n) for n in args.notebooks] or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    failed = []
    for path in paths:
        try:
            nb, seconds = execute(path, overrides, args.timeout, args.kernel, args.threads)
        except (CellExecutionError, CellTimeoutError) as e:
            failed.append(path.name)
            print(f"FAIL {path.name}\n{e}", flush=True)
            continue
        print(f"ok   {path.name}  {seconds:5.1f} s", flush=True)
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
