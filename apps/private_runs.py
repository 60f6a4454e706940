"""Runs made in one browser session (chat turns, live runs) stay private to that session.

A private run lives in `RUNS/.private/<token>/<run>.zarr`, `<token>` 128 random bits made for that run.
The session refers to it as `@<token>/<run>.zarr` (kept in its own gr.State / dropdown value); nothing
lists `.private` (list_runs and the runs table show only the runs directly in RUNS, never hidden
names), so another session can neither see the run nor guess its name. `publish` copies it into RUNS
on purpose (the "Save to shared runs" button), where every session sees it.

    name = new_name("live-20260101-120000-ab12cd.zarr")   # '@<token>/live-….zarr'
    path = path_for(runs_dir, name)                       # where to record (private or a shared name)
    resolve(runs_dir, name)                               # an existing private run, or UserError
    publish(runs_dir, name)                               # → the shared name of its copy in RUNS
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

PRIVATE_DIR = ".private"
PREFIX = "@"
_NAME = re.compile(r"^@([0-9a-f]{32})/((?:chat|live)-[0-9A-Za-z_-]{1,80}\.zarr)$")


class PrivateRunError(ValueError):
    """A private run name that is malformed or names no run (the app shows it as a user message)."""


def is_private(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def new_name(run_name: str) -> str:
    """A fresh private name for a run called `run_name` (a chat-… or live-… name)."""
    name = f"{PREFIX}{secrets.token_hex(16)}/{run_name}"
    if not _NAME.match(name):
        raise PrivateRunError(f"not a chat or live run name: {run_name!r}")
    return name


def _parts(name: str) -> tuple[str, str]:
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise PrivateRunError(f"Invalid private run name {name!r}.")
    return m.group(1), m.group(2)


def path_for(runs_dir, name: str) -> Path:
    """Where run `name` is (or will be) recorded: a private name's own directory (created), or a shared
    name directly in `runs_dir`."""
    if not is_private(name):
        return Path(runs_dir) / name
    token, run = _parts(name)
    d = Path(runs_dir) / PRIVATE_DIR / token
    d.mkdir(parents=True, exist_ok=True)
    return d / run


def resolve(runs_dir, name: str) -> Path:
    """The path of an existing private run, refusing anything that is not exactly one (no symlink out)."""
    token, run = _parts(name)
    root = (Path(runs_dir) / PRIVATE_DIR / token).resolve()
    path = (root / run).resolve()
    if path.parent != root or not (path / "zarr.json").is_file():
        raise PrivateRunError(f"No run named {run!r} in this session (it may have been made in another "
                              "browser session, or the server was restarted with another runs directory).")
    return path


def publish(runs_dir, name: str) -> str:
    """Copy private run `name` into `runs_dir` under its plain run name, so every session lists it;
    returns that name. A shared name is returned unchanged (it is shared already)."""
    if not is_private(name):
        return name
    src, (_, run) = resolve(runs_dir, name), _parts(name)
    dst = Path(runs_dir) / run
    if dst.exists():
        raise PrivateRunError(f"A shared run named {run!r} exists already.")
    tmp = Path(runs_dir) / f".{run}.publishing-{secrets.token_hex(4)}"
    try:
        shutil.copytree(src, tmp, symlinks=True)
        tmp.rename(dst)                 # the runs list never shows a half-copied run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run
