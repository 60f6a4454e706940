"""Training data: the domain-labelled text corpus, synthetic key–value retrieval documents and
arithmetic, each a token stream with a held-out part; random windows from a domain mixture.

Corpus (shared/data/README.md): `arxiv.txt`, `c4.txt`, `github.txt`, `wikipedia.txt`, the texts the
OLMoE paper used for its routing analyses (allenai/OLMoE `scripts/routing_output/text/`). They are
read from a directory given on the command line and never copied into the repository. The files
have no document separators, so the held-out split is the **last** `heldout_frac` of each file,
cut at a line boundary: no held-out line is ever trained on.

Synthetic domains are generated from a seed (held-out: a different seed):

    kv     Records:\\n k 4821 v 7302\\n … Lookup k 4821 v 7302\\n …   (2 … max_pairs records, 1–3 lookups)
    arith  37 + 485 = 522\\n 12 * 7 = 84\\n …

A training row is one window of `seq_len + 1` tokens from one domain, so the router sees whole
single-domain sequences (the setting of OLMoE's domain-specialization probe, science.md §1.1).
Synthetic windows start at a document start so that the lookups' records are in context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_DOMAINS = ("arxiv", "c4", "github", "wikipedia")
SYNTHETIC_DOMAINS = ("kv", "arith")
DEFAULT_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "domain_texts"


def find_corpus(path: str | Path | None = None) -> Path:
    """The corpus directory: `path`, else `../shared/data/domain_texts` next to the repository."""
    candidates = [Path(path)] if path else [DEFAULT_CORPUS, Path.cwd().parent / "shared" / "data" / "domain_texts"]
    for c in candidates:
        if c.is_dir() and all((c / f"{d}.txt").exists() for d in TEXT_DOMAINS):
            return c
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no domain corpus ({', '.join(d + '.txt' for d in TEXT_DOMAINS)}) in {where}; "
                            "pass --corpus DIR (see shared/data/README.md)")


def split_text(text: str, heldout_frac: float) -> tuple[str, str]:
    """(train, held-out): the last `heldout_frac` of the characters, moved forward to a line start."""
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    cut = int(len(text) * (1.0 - heldout_frac))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl != -1 else cut
    return text[:cut], text[cut:]


def read_corpus(path: str | Path | None, heldout_frac: float = 0.1) -> dict[str, tuple[str, str]]:
    """{domain: (train text, held-out text)} for the four text domains."""
    root = find_corpus(path)
    return {d: split_text((root / f"{d}.txt").read_text(encoding="utf-8"), heldout_frac) for d in TEXT_DOMAINS}


# ------------------------------------------------------------------------------------ synthetic
@dataclass
class KVDoc:
    text: str                           # the whole document (records, then lookups with answers)
    prompt: str                         # the document cut just before the first lookup's value
    answer: str                         # that value, e.g. " 7302"


def kv_document(rng: random.Random, n_pairs: int, n_lookups: int = 1, digits: int = 4,
                depth: float | None = None) -> KVDoc:
    """A key–value retrieval document. `depth` in [0, 1] places the first lookup's record at that
    relative position (needle depth); None = anywhere."""
    lo, hi = 10 ** (digits - 1), 10 ** digits
    keys = rng.sample(range(lo, hi), n_pairs)
    values = [rng.randrange(lo, hi) for _ in keys]
    first = rng.randrange(n_pairs) if depth is None else min(int(depth * n_pairs), n_pairs - 1)
    lookups = [first] + [rng.randrange(n_pairs) for _ in range(n_lookups - 1)]
    records = "".join(f"k {k} v {v}\n" for k, v in zip(keys, values))
    head = f"Records:\n{records}Lookup k {keys[first]} v"
    tail = f" {values[first]}\n" + "".join(f"Lookup k {keys[i]} v {values[i]}\n" for i in lookups[1:])
    return KVDoc(head + tail, head, f" {values[first]}")


def arithmetic_document(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randrange(2, 100), rng.randrange(2, 20)
            c = a * b
        else:
            a, b = rng.randrange(0, 1000), rng.randrange(0, 1000)
            a, b = (a, b) if op == "+" or a >= b else (b, a)
            c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}\n")
    return "".join(lines)


def synthetic_texts(domain: str, n_docs: int, seed: int, max_pairs: int | None = None, digits: int = 4) -> list[str]:
    """`n_docs` documents of a synthetic domain; max_pairs bounds kv documents to about one
    256-token window (default 28 records of ≈ 8 tokens with 4-digit numbers, 42 of ≈ 6 with 3 digits:
    the BPE splits digits in groups of ≤ 3, so a 3-digit key or value is a single token)."""
    rng = random.Random(f"{domain}:{seed}")
    if domain == "kv":
        max_pairs = max_pairs or (28 if digits >= 4 else 42)
        return [kv_document(rng, rng.randint(2, max_pairs), n_lookups=rng.randint(1, 3), digits=digits).text
                for _ in range(n_docs)]
    if domain == "arith":
        return [arithmetic_document(rng, rng.randint(4, 24)) for _ in range(n_docs)]
    raise ValueError(f"unknown synthetic domain {domain!r}; known: {SYNTHETIC_DOMAINS}")


# ------------------------------------------------------------------------------------ token streams
@dataclass
class Stream:
    tokens: torch.Tensor                # (N,) int64
    starts: torch.Tensor | None = None  # allowed window starts (document starts); None = anywhere


def _pieces(text: str, lines: int = 64) -> list[str]:
    """Cut at line ends into pieces of `lines` lines, so `encode_batch` can use its threads."""
    ls = text.splitlines(keepends=True)
    return ["".join(ls[i:i + lines]) for i in range(0, len(ls), lines)]


def encode_text(tok, text: str) -> torch.Tensor:
    encs = tok.encode_batch(_pieces(text), add_special_tokens=False)
    return torch.tensor([i for e in encs for i in e.ids], dtype=torch.long)


def encode_docs(tok, docs: list[str], bos: int, eos: int) -> Stream:
    """Documents as `<|begin_of_text|> doc <|end_of_text|>`, concatenated; windows start at a BOS."""
    encs = tok.encode_batch(docs, add_special_tokens=False)
    ids, starts = [], []
    for e in encs:
        starts.append(len(ids))
        ids += [bos, *e.ids, eos]
    return Stream(torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long))


def build_streams(tok, corpus: dict[str, tuple[str, str]], bos: int, eos: int, seed: int,
                  synthetic_docs: dict[str, int] | None = None,
                  kv_digits: int = 4) -> tuple[dict[str, Stream], dict[str, Stream]]:
    """(train, held-out) streams for every domain."""
    synthetic_docs = synthetic_docs or {"kv": 6000, "arith": 2000}
    train, held = {}, {}
    for d, (tr, ho) in corpus.items():
        train[d], held[d] = Stream(encode_text(tok, tr)), Stream(encode_text(tok, ho))
    for d, n in synthetic_docs.items():
        train[d] = encode_docs(tok, synthetic_texts(d, n, seed, digits=kv_digits), bos, eos)
        held[d] = encode_docs(tok, synthetic_texts(d, max(n // 10, 50), seed + 10_000, digits=kv_digits), bos, eos)
    return train, held


def sample_batch(streams: dict[str, Stream], weights: dict[str, float], batch: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T), y (B, T) next tokens, domain index (B,) into `list(weights)`; a function of `gen` only,
    so a run resumed at step s draws the same batches as an uninterrupted one."""
    names = list(weights)
    w = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    dom_B = torch.multinomial(w, batch, replacement=True, generator=gen)
    rows = []
    for d in dom_B.tolist():
        s = streams[names[d]]
        n = len(s.tokens) - seq_len - 1
        if n <= 0:
            raise ValueError(f"domain {names[d]!r} has {len(s.tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
        if s.starts is None:
            i = int(torch.randint(0, n + 1, (1,), generator=gen))
        else:
            ok = s.starts[s.starts <= n]
            i = int(ok[torch.randint(0, len(ok), (1,), generator=gen)])
        rows.append(s.tokens[i:i + seq_len + 1])
    xy = torch.stack(rows)                                  # (B, T+1)
    return xy[:, :-1], xy[:, 1:], dom_B


def eval_windows(stream: Stream, seq_len: int, max_windows: int) -> torch.Tensor:
    """Deterministic, non-overlapping (seq_len+1)-token windows from the start of a held-out stream."""
    n = min(max_windows, (len(stream.tokens) - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"held-out stream of {len(stream.tokens)} tokens is shorter than one window")
    return torch.stack([stream.tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])   # (n, T+1)
