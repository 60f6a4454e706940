"""Crash-safe writing of checkpoint files and directories (used by every saver: `save_model`,
`save_multimodal`, the int4 and fp8 writers).

* `_atomic(final, write)`: one file written under a hidden temporary name, fsynced, renamed.
* `checkpoint_dir(path)`: a whole checkpoint directory — written in place when fresh, or beside the
  old one and swapped in atomically when re-saving, so `path` always holds a complete checkpoint.
* `recover_checkpoint(path)`: the loaders' repair step for a save killed mid-way through the
  two-rename fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:                     # not POSIX: no locks, so every leftover counts as stale
    fcntl = None

INDEX = "model.safetensors.index.json"


def _atomic(final: Path, write) -> None:
    """`write(tmp)` to a hidden temporary name next to `final`, fsync it, then rename it to `final`."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; give the file open()'s usual mode
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------- crash-safe checkpoint directories
# A re-save writes the whole new checkpoint into `.{name}.staging-XXXXXXXX` next to the checkpoint
# directory and swaps the two directories with one renameat2(RENAME_EXCHANGE); the previous checkpoint
# then sits under the staging name and is deleted. Where the kernel or filesystem cannot exchange, two
# renames do it (`{name}` → `.{name}.old-XXXXXXXX`, staging → `{name}`): a kill between them leaves no
# `{name}`, and the next load or save renames the old checkpoint back. A live saver holds flock()s on the
# directory it replaces (taken first) and on its staging directory, so leftovers are told from work in
# progress: a later save into `{name}`, unless another is running, deletes every unlocked
# `.{name}.staging-*` / `.{name}.old-*` sibling (those of a killed save: the kernel drops its locks).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-[A-Za-z0-9_]+")
_RENAME_EXCHANGE = 2                # <linux/fs.h>
_AT_FDCWD = -100


def _step(name: str) -> None:
    """A named point of a re-save ("staged", "moved-aside", "swapped"); tests SIGKILL the saver here."""


@contextlib.contextmanager
def checkpoint_dir(path: str | os.PathLike) -> Iterator[Path]:
    """The directory to write a whole checkpoint into; it becomes `path` when the block ends.

    - `path` absent or an empty directory (a fresh save): the files go straight into `path`. Write them
      with `_atomic` and the index or config last, so a killed save leaves only complete files and a
      directory that `load_model` refuses.
    - `path` holds files (a re-save): the block writes into a fresh sibling staging directory; on a
      normal exit the entries of `path` that the new checkpoint does not write are carried over
      (hard links, else copies: README.md, eval results, a tokenizer.json the new model lacks, …) —
      except the old weights (`model*.safetensors`, the index) and temporary files of killed writes —
      then everything is fsynced and the staging directory is atomically exchanged with `path`, and the
      old checkpoint deleted. If the block raises, the staging directory is deleted and `path` is
      untouched. A re-save needs room for both checkpoints at once.

    Refused with a clear error: `path` a symlink (the swap would replace the link, not its target), a
    file, a mount point being re-saved, or a re-save whose parent directory is not writable."""
    out = Path(path)
    if out.is_symlink():
        raise ValueError(f"{out} is a symlink (to {os.readlink(out)}); checkpoints are saved by swapping "
                         f"directories, which would replace the link rather than its target — save to "
                         f"{out.resolve()} instead")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a checkpoint directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out, clean=True)
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(exist_ok=True)
        yield out
        _fsync(out)
        return
    if out.stat().st_dev != out.parent.stat().st_dev:
        raise OSError(errno.EXDEV, f"{out} is a mount point; a re-save swaps the checkpoint directory, which a "
                      "mount point cannot be — save into a directory inside it")
    locks = [_lock(out)]            # held first: while it is, no other save deletes leftovers of `out`
    try:
        try:
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        except OSError as e:
            if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
                raise
            raise type(e)(e.errno, f"cannot re-save {out}: its parent directory {out.parent} is not writable "
                          f"({e.strerror}); a re-save writes the new checkpoint beside the old one and swaps "
                          "them, so the old checkpoint survives a crash — make the parent writable or save "
                          "elsewhere") from None
        locks.append(_lock(staging))
        try:
            yield staging
            _carry_extras(out, staging)
            os.chmod(staging, stat.S_IMODE(out.stat().st_mode))      # mkdtemp's 0700 → the old directory's
            _fsync(staging)
            _step("staged")
        except BaseException:
            _remove_tree(staging)
            raise
        _swap(staging, out)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)


def recover_checkpoint(path: str | os.PathLike) -> None:
    """If `path` is missing because a save was killed between the two renames of the fallback swap,
    rename the previous checkpoint (`.{name}.old-*`) back to `path`. Best effort; loaders call it."""
    if not os.path.lexists(path):
        _recover(Path(path), clean=False)


def _recover(out: Path, clean: bool) -> None:
    try:
        leftovers = [(m["kind"], out.parent / e.name) for e in os.scandir(out.parent)
                     if (m := _LEFTOVER.fullmatch(e.name)) and m["name"] == out.name
                     and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    if not leftovers or (os.path.lexists(out) and not _unlocked(out)):
        return                              # nothing left over, or a save into `out` is running
    stale = [(kind, p) for kind, p in leftovers if _unlocked(p)]
    if not os.path.lexists(out):
        aside = sorted((p for kind, p in stale if kind == "old" and (p / "config.json").exists()),
                       key=lambda p: p.stat().st_mtime)
        if aside:
            try:
                os.rename(aside[-1], out)
                stale = [(kind, p) for kind, p in stale if p != aside[-1]]
            except OSError:
                return
    if clean and os.path.lexists(out):
        for _, p in stale:
            _remove_tree(p)


def _carry_extras(out: Path, staging: Path) -> None:
    for entry in os.scandir(out):
        name = entry.name
        if os.path.lexists(staging / name) or name == INDEX or fnmatch.fnmatch(name, "model*.safetensors"):
            continue
        if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp")):
            continue                        # a killed write's temp file (ours, or the tokenizers library's)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), staging / name)
        elif entry.is_dir():
            shutil.copytree(entry.path, staging / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, staging / name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        _fsync(dst)


def _swap(staging: Path, out: Path) -> None:
    """Put the complete checkpoint in `staging` at `out` and delete the one that was there. If a rename
    fails, `out` keeps the previous checkpoint and `staging` is deleted."""
    try:
        exchanged = _exchange(staging, out)
    except BaseException:
        _remove_tree(staging)
        raise
    if exchanged:
        _step("swapped")
        _fsync(out.parent)
        _remove_tree(staging)               # now the previous checkpoint
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}_{secrets.token_hex(4)}"
    try:
        os.rename(out, aside)
    except BaseException:
        _remove_tree(staging)
        raise
    _step("moved-aside")
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        _remove_tree(staging)
        raise
    _step("swapped")
    _fsync(out.parent)
    _remove_tree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange the directories `a` and `b` (Linux renameat2); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):       # old kernel, or the filesystem lacks it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):       # glibc < 2.28, or a libc without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _lock(directory: Path) -> int | None:
    """An fd holding an exclusive flock on `directory` (released when closed or when the process dies)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlocked(directory: Path) -> bool:
    """True unless a live saver holds `directory`'s lock (False too when it cannot be opened)."""
    if fcntl is None:
        return True
    fd = _lock(directory)
    if fd is None:
        return False
    os.close(fd)
    return True


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        warnings.warn(f"could not delete {path} (a previous checkpoint or an unfinished save); the next save "
                      f"into {path.parent / _LEFTOVER.fullmatch(path.name)['name']} retries", stacklevel=3)


def _fsync(path) -> None:
    if os.name == "nt" and os.path.isdir(path):      # Windows cannot open a directory to sync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
