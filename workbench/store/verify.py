"""Full verification of a run: read every committed value and check it against the commit record.

    problems = verify_problems(run)       # [] when whole;  Run.verify() raises StoreError listing them

`open_run` already checks what costs no chunk data (reader.py: files, chunk presence and sizes, the
commit record, doc_offsets shape, router/layer_index). This reads everything once, in token windows of
at most WINDOW_BYTES per array, and checks:

    tokens          every id in [0, vocab_size); the chained per-document input_hash equals the
                    committed one (an edited doc_offsets, swapped or edited token chunks fail here)
    positions       restart at 0 at every document edge and count up by one
    router/experts  ids in [0, n_experts), distinct within each token's top-k
    attention/n_keys  at least 1
    doc_id          unique and non-empty
    every array     its chained per-document digest equals `data_digests[name]` in the commit record
                    (runs from writers since data_digests were added; older runs say so and skip it)

Cost: one read of the run (the same bytes `to_xarray().load()` would read) plus sha256 over them.
"""

from __future__ import annotations

import numpy as np

from workbench.store.schema import EMPTY_INPUT_HASH, SCHEMA, TOKEN, digest_init, digest_piece

WINDOW_BYTES = 64 << 20


def _windows(n_tokens: int, width: int):
    """[a, b) token windows of at most `width` tokens (at least one)."""
    a = 0
    while a < n_tokens:
        b = min(n_tokens, a + max(1, width))
        yield a, b
        a = b


def _token_array_pass(run, name: str, check, chain: bool) -> tuple[list[str], str | None]:
    """Stream array `name` in token windows; call check(window_token_major, a, b) → list of problems;
    with `chain`, also return the per-document digest chain of the array (else None)."""
    arr, spec = run.array(name), SCHEMA[name]
    axis = spec.dims.index(TOKEN)
    row = int(np.prod([s for i, s in enumerate(arr.shape) if i != axis])) * np.dtype(arr.dtype).itemsize
    offsets, problems = run.doc_offsets, []
    d, h, hasher = 0, EMPTY_INPUT_HASH, None
    for a, b in _windows(run.n_tokens, WINDOW_BYTES // max(row, 1)):
        sel = tuple(slice(a, b) if i == axis else slice(None) for i in range(len(spec.dims)))
        data = np.moveaxis(np.asarray(run.array(name)[sel]), axis, 0)        # token-major (T, ...)
        problems += check(data, a, b)
        if not chain:
            continue
        t = a
        while t < b:
            while offsets[d + 1] <= t:                                       # documents start here
                d += 1
            if hasher is None:
                hasher = digest_init(h)
            end = min(b, int(offsets[d + 1]))
            digest_piece(hasher, data[t - a:end - a])
            if end == offsets[d + 1]:
                h, hasher = hasher.hexdigest(), None
            t = end
    return problems, (h if chain else None)


def verify_problems(run) -> list[str]:
    """Every problem with `run`'s committed data (see the module docstring); [] when it is whole."""
    problems: list[str] = []
    digests = run.attrs.get("data_digests")
    digests = digests if isinstance(digests, dict) else None
    vocab, n_experts = run.vocab_size, run.layout.n_experts
    offsets = run.doc_offsets
    starts = np.zeros(run.n_tokens, dtype=bool)
    starts[offsets[:-1][offsets[:-1] < run.n_tokens]] = True

    def tokens_check(x, a, b):
        out = []
        if x.size and (x.min() < 0 or (vocab is not None and x.max() >= vocab)):
            out.append(f"tokens[{a}:{b}] hold ids outside [0, {vocab}) (min {x.min()}, max {x.max()})")
        return out

    def positions_check(x, a, b):
        # positions = index within the document: 0 at every start, previous + 1 elsewhere
        prev = np.concatenate([[positions_check.last], x[:-1]]) if x.size else x
        want = np.where(starts[a:b], 0, prev + 1)
        positions_check.last = int(x[-1]) if x.size else positions_check.last
        bad = np.flatnonzero(x != want)
        return [f"positions disagree with doc_offsets at token {a + int(bad[0])} "
                f"({int(x[bad[0]])}, expected {int(want[bad[0]])})"] if bad.size else []
    positions_check.last = -1

    def experts_check(x, a, b):      # x: (T, moe_layer, k)
        out = []
        if x.size and (x.min() < 0 or x.max() >= n_experts):
            out.append(f"router/experts[:, {a}:{b}] hold ids outside [0, {n_experts}) (min {x.min()}, max {x.max()})")
        elif x.shape[-1] > 1:
            s = np.sort(x, axis=-1)
            if np.any(s[..., 1:] == s[..., :-1]):
                out.append(f"router/experts[:, {a}:{b}] repeat an expert within one token's top-k")
        return out

    def n_keys_check(x, a, b):
        return [f"attention/n_keys[:, {a}:{b}] has values below 1"] if x.size and x.min() < 1 else []

    checks = {"tokens": tokens_check, "positions": positions_check, "router/experts": experts_check,
              "attention/n_keys": n_keys_check}
    names = [n for n in run.layout.arrays() if TOKEN in SCHEMA[n].dims]
    for name in names:
        try:
            # tokens always: its chain is the input_hash (writer.flush, chain_input_hash: the same bytes)
            found, h = _token_array_pass(run, name, checks.get(name, lambda x, a, b: []),
                                         chain=digests is not None or name == "tokens")
        except Exception as e:     # a chunk that fails to decode (crc32c mismatch, truncation)
            problems.append(f"array {name!r} cannot be read: {type(e).__name__}: {e}")
            continue
        problems += found
        if name == "tokens" and h != run.attrs.get("input_hash"):
            problems.append("the tokens and doc_offsets do not reproduce the committed input_hash: documents "
                            "were edited, re-split or reordered after recording")
        if digests is not None and name in digests and h != digests[name]:
            problems.append(f"array {name!r} does not match its committed digest: chunks were swapped, "
                            "replaced or edited after recording")

    for name in ("doc_id", "doc_domain"):
        try:
            values = [str(v) for v in np.asarray(run.array(name)[: run.n_docs])]
        except Exception as e:
            problems.append(f"array {name!r} cannot be read: {type(e).__name__}: {e}")
            continue
        if name == "doc_id":
            seen, dup = set(), []
            for v in values:
                (dup.append(v) if v in seen else seen.add(v))
            if dup or "" in seen:
                problems.append(f"doc_id has duplicate or empty ids: {sorted(set(dup))[:4]}")
        if digests is not None and name in digests:
            h = EMPTY_INPUT_HASH
            for v in values:
                hasher = digest_init(h)
                digest_piece(hasher, np.array([v], dtype=object))
                h = hasher.hexdigest()
            if h != digests[name]:
                problems.append(f"array {name!r} does not match its committed digest: edited after recording")
    return problems
