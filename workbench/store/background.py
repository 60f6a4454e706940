"""Store writes that overlap compute: a `RunWriter` driven by one worker thread behind a bounded queue.

    with BackgroundWriter(RunWriter.create(...)) as w:     # record() does this
        for doc in docs:
            w.append(compute(doc))        # returns at once; blocks only while `max_bytes` are queued
        w.finish()                        # waits for every queued document, then marks the run complete

The worker takes *everything* queued so far as one batch and appends it to the writer, then looks
again. It commits (`RunWriter.flush`) once `commit_tokens` tokens are pending (default: one probe chunk
of tokens, 16,384, or the writer's `flush_tokens` when smaller), so every commit writes whole chunks
while later documents are computed. Committing every document instead rewrote each partly filled chunk
once per document (read, decode, merge, encode): on `tiny` at 32K tokens that cost 35 % of record time
in CPU against 4-9 % for one inline commit (docs/benchmarks.md, throughput notes). When writing falls
behind, batches grow. The writer's own thresholds (`flush_tokens`, `flush_seconds`) still apply.

Crash safety is the writer's, unchanged: the worker runs exactly the calls a synchronous recorder
would (append, append, …, flush — in document order, from one thread), so every commit is the same
single atomic attribute write, a kill loses only uncommitted documents, and resume works as before.
An exception in the worker (a full disk, a bad document) is raised again, as itself, by the next
`append`, `flush`, `finish` or `close` on the calling thread; nothing more is written after it.

Torch ops and the zarr codecs release the GIL, so on a machine with a spare core the writes cost
the recorder little. On a shared 2-core machine zarr's Python-level work per chunk still competes with
compute: record stayed ~7 % slower than compute alone on `tiny` at 32K, though only 3.6 % of it was
spent waiting in store calls (benchmarks/throughput.py --only store; docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from workbench.store.schema import TOKEN_CHUNK_MAX
from workbench.store.writer import FLUSH_TOKENS, RunWriter

_FLUSH, _FINISH, _STOP = object(), object(), object()


def _nbytes(doc: Mapping) -> int:
    return sum(v.nbytes for v in doc.values() if isinstance(v, np.ndarray))


class BackgroundWriter:
    """`append`/`flush`/`finish`/`close` of `writer`, run on a worker thread. At most `max_bytes` of
    documents wait in the queue (one larger document is still accepted when the queue is empty); the
    worker commits once `commit_tokens` are pending (see the module docstring), and on flush/finish/close."""

    def __init__(self, writer: RunWriter, max_bytes: int = 256 << 20, commit_tokens: int | None = None,
                 *, _opener: Callable[[], RunWriter] | None = None, _path: Path | None = None,
                 _flush_tokens: int | None = None):
        flush_tokens = writer.flush_tokens if writer is not None else _flush_tokens
        if commit_tokens is None:
            commit_tokens = min(TOKEN_CHUNK_MAX, flush_tokens)
        if not isinstance(commit_tokens, int) or isinstance(commit_tokens, bool) or commit_tokens < 1:
            raise ValueError(f"commit_tokens must be a positive integer, got {commit_tokens!r}")
        self._commit_tokens = commit_tokens
        self.writer, self._opener = writer, _opener
        # read before the worker starts: it owns the writer after (a run created by the worker is empty)
        self.done_ids = writer.done_ids if writer is not None else set()
        path = writer.path if writer is not None else Path(_path)
        self._max_bytes = max_bytes
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._reported = False                    # the error was raised to the caller once already
        self._finished = False
        self._idle = True
        self._thread = threading.Thread(target=self._run, name=f"store-writer:{path.name}", daemon=True)
        self._thread.start()

    @classmethod
    def creating(cls, path, open_writer: Callable[[], RunWriter], flush_tokens: int = FLUSH_TOKENS,
                 **kwargs) -> BackgroundWriter:
        """A background writer for a run that does not exist yet: `open_writer` (e.g. a `RunWriter.create`
        call) runs on the worker, so creating the store overlaps the first document's compute (~30-45 ms
        of metadata files on `tiny`). An error creating it is raised, as itself, by the next call."""
        if Path(path).exists():
            raise FileExistsError(f"{path} exists: open its writer first (resume needs its done_ids)")
        return cls(None, _opener=open_writer, _path=Path(path), _flush_tokens=flush_tokens, **kwargs)

    # ------------------------------------------------------------------ calling thread
    def append(self, doc: Mapping) -> None:
        """Queue one document (the dict `RunWriter.append` takes). Its arrays must not be modified after."""
        n = _nbytes(doc)
        with self._cv:
            self._cv.wait_for(lambda: self._error is not None or not self._queue
                              or self._queued_bytes + n <= self._max_bytes)
            self._raise()
            self._queue.append(doc)
            self._queued_bytes += n
            self._cv.notify_all()

    def flush(self) -> None:
        """Return when every queued document is committed."""
        self._barrier(_FLUSH)

    def finish(self) -> None:
        """Commit everything queued and mark the run complete."""
        self._barrier(_FINISH)

    def close(self) -> None:
        """Commit what is queued (unless the worker failed) and stop the worker; raises its error."""
        if self._thread.is_alive():
            with self._cv:
                self._queue.append(_STOP)
                self._cv.notify_all()
            self._thread.join()
        if not self._reported:
            self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:                                     # the caller's error wins; still stop the worker cleanly
            try:
                self.close()
            except BaseException:                 # noqa: BLE001 - already failing with the caller's error
                pass

    def _barrier(self, marker) -> None:
        with self._cv:
            self._raise()
            self._queue.append(marker)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._error is not None or (not self._queue and self._idle))
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        if self.writer is None:
            try:
                self.writer = self._opener()
            except BaseException as e:            # noqa: BLE001 - handed to the calling thread
                with self._cv:
                    self._error = e
                    self._queue.clear()
                    self._cv.notify_all()
                return
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._queue))
                batch = list(self._queue)         # everything queued so far is one batch
                self._queue.clear()
                self._queued_bytes = 0
                self._idle = False
                self._cv.notify_all()             # a blocked append may go on
            stop = False
            try:
                for item in batch:
                    if item is _STOP:
                        stop = True
                    elif item is _FINISH:
                        self.writer.finish()
                        self._finished = True
                    elif item is _FLUSH:
                        self.writer.flush()
                    else:
                        self.writer.append(item)
                if stop:
                    self.writer.close()
                elif not self._finished and self.writer.pending_tokens >= self._commit_tokens:
                    self.writer.flush()           # commit whole chunks while later documents are computed
            except BaseException as e:            # noqa: BLE001 - handed to the calling thread
                with self._cv:
                    self._error = e
                    self._queue.clear()
                    self._idle = True
                    self._cv.notify_all()
                return
            with self._cv:
                self._idle = True
                self._cv.notify_all()
            if stop:
                return
