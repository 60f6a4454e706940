"""Open files from a run or checkpoint directory without hanging, escaping it or reading without bound.

A run store or checkpoint is data a user may have copied from anywhere, so every file a reader opens
must be a regular file (a FIFO blocks `open` for ever, `/dev/zero` reads until memory runs out), and
what it reads is bounded by what the metadata says the file can hold.

    read_bounded(path, max_bytes, what)        bytes of a regular file, at most max_bytes
    regular_file(path, what)                   stat of a regular file (symlinks followed), else an error
    confined_name(name, directory, what)       `directory / name` for a plain relative name inside it

The checks name the file and what was wrong with it; the error type is the caller's (StoreError,
CheckpointError), passed as `error`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath


def kind_of(mode: int) -> str:
    """A readable name for a non-regular file type (for error messages)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(path, max_bytes: int, what: str = "file", *, follow_symlinks: bool = False,
                 error: type[Exception] = ValueError) -> bytes:
    """The bytes of `path`, refusing (with `error`) a symlink (unless `follow_symlinks`), anything but a
    regular file, and a file larger than `max_bytes`. FileNotFoundError propagates unchanged.

    O_NONBLOCK makes opening a FIFO return at once (fstat then refuses it); O_NOFOLLOW makes a
    symlink fail to open (ELOOP) instead of being read through; the size check uses the open file's
    fstat, so a file swapped in after a separate stat cannot slip past it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: {what} is a symlink (to {os.readlink(path)!r}); refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is {kind_of(st.st_mode)}, expected a regular file")
        if st.st_size > max_bytes:
            raise error(f"{path}: {what} is {st.st_size} bytes, more than the {max_bytes} its metadata allows")
        os.set_blocking(fd, True)
        chunks, left = [], st.st_size + 1        # one byte more: a file that grew since fstat is refused
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise error(f"{path}: {what} grew past {max_bytes} bytes while being read")
        return data
    finally:
        os.close(fd)


def regular_file(path, what: str = "file", *, error: type[Exception] = ValueError) -> os.stat_result:
    """os.stat(path) (symlinks followed) when it is a regular file; `error` naming what it is otherwise."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is {kind_of(st.st_mode)}, expected a regular file")
    return st


def confined_name(name, directory, what: str = "file name", *,
                  error: type[Exception] = ValueError) -> Path:
    """`directory / name` when `name` is a plain relative path that stays inside `directory` (no
    absolute path, no `..`, no empty or NUL name); `error` naming the entry otherwise."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise error(f"{directory}: {what} {name!r} is not a file name")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or name.startswith("~"):
        raise error(f"{directory}: {what} {name!r} points outside the directory; only names inside it are read")
    return Path(directory) / p
