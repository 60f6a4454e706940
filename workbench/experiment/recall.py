"""Multi-query associative recall (Zoology-style) and its passkey/needle special case.

Token layout of one sequence of length n (the one `task.json` describes, spec: issue 16 §2):

    BOS  f f k₁ v₁ f f f k₂ v₂ f … f (d₁ e₁) f …  q₁ a₁ q₂ a₂ … q_Q a_Q
    └──────── haystack: filler, `pairs` planted (key, value) pairs ───────┘ └─ queries ─┘

* keys, values and filler come from disjoint id ranges `[lo, hi)`; the planted keys are distinct;
* each query key q_j is one of the planted keys (distinct queries), followed by its value a_j;
* the model predicts a_j at the position of q_j: those are the only answer positions (the loss
  and the accuracy count them alone);
* optional distractor pairs (d, e): keys never queried and never planted, with random values, about
  `distractor_density` pairs per token of haystack — they make the lookup harder without changing
  the layout (a distractor key can repeat; the planted keys are unique).

The needle (passkey) evaluation is the same layout with pairs = queries = 1, the pair at a chosen depth.
Everything is drawn from a `torch.Generator`, so a batch is a function of its seed alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch


class TaskError(ValueError):
    """A recall task description is inconsistent; the message names the key and value."""


@dataclass(frozen=True)
class RecallTask:
    vocab_size: int = 256
    bos_id: int = 1
    key_ids: tuple[int, int] = (16, 80)
    value_ids: tuple[int, int] = (80, 144)
    filler_ids: tuple[int, int] = (144, 256)
    pairs: int = 8
    queries: int = 8
    train_length: int = 128

    def __post_init__(self):
        rng = {"key_ids": self.key_ids, "value_ids": self.value_ids, "filler_ids": self.filler_ids}
        for name, r in rng.items():
            if (not isinstance(r, (tuple, list)) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                    or not 0 <= r[0] < r[1] <= self.vocab_size):
                raise TaskError(f"task key {name!r} must be [lo, hi) with 0 ≤ lo < hi ≤ vocab_size="
                                f"{self.vocab_size}, got {r!r}")
            object.__setattr__(self, name, (int(r[0]), int(r[1])))
        spans = sorted(rng.items(), key=lambda kv: kv[1][0])
        for (a, ra), (b, rb) in zip(spans, spans[1:]):
            if ra[1] > rb[0]:
                raise TaskError(f"task id ranges {a}={list(ra)} and {b}={list(rb)} overlap")
        if any(lo <= self.bos_id < hi for lo, hi in rng.values()):
            raise TaskError(f"task bos_id={self.bos_id} lies inside a key/value/filler range")
        for name in ("pairs", "queries", "train_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TaskError(f"task key {name!r} must be a positive integer, got {v!r}")
        if self.queries > self.pairs:
            raise TaskError(f"task queries={self.queries} exceeds pairs={self.pairs} "
                            "(queries are distinct planted keys)")
        if self.pairs > self.n_keys:
            raise TaskError(f"task pairs={self.pairs} needs that many distinct keys; key_ids has {self.n_keys}")
        if self.min_length(0.0) > self.train_length:
            raise TaskError(f"task train_length={self.train_length} is shorter than the layout needs "
                            f"({self.min_length(0.0)} tokens for {self.pairs} pairs and {self.queries} queries)")

    @property
    def n_keys(self) -> int:
        return self.key_ids[1] - self.key_ids[0]

    @property
    def n_values(self) -> int:
        return self.value_ids[1] - self.value_ids[0]

    def min_length(self, distractor_density: float = 0.0) -> int:
        return layout_length(self.pairs, self.queries)

    # ------------------------------------------------------------------ task.json
    def to_json(self) -> dict:
        d = {"task": "associative_recall", **asdict(self)}
        for k in ("key_ids", "value_ids", "filler_ids"):
            d[k] = list(d[k])
        d["layout"] = ("BOS, then a haystack of filler ids in which `pairs` (key, value) pairs are planted as "
                       "adjacent tokens at uniformly random non-overlapping positions (distinct keys), then "
                       "`queries` (key, value) pairs at the end, each key a distinct one of the planted keys in "
                       "random order; the model predicts each query's value at the position of its key "
                       "(answer positions: n - 2·queries + 2j for j = 0..queries-1, 0-based, predicting the "
                       "token at the next position); total length n = the evaluation length")
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "task.json") -> RecallTask:
        if not isinstance(d, dict):
            raise TaskError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("task", "associative_recall") != "associative_recall":
            raise TaskError(f"{source}: key 'task' must be 'associative_recall', got {d.get('task')!r}")
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("bos_id", "key_ids", "value_ids", "filler_ids", "pairs", "queries", "train_length")
                   if k not in d]
        if missing:
            raise TaskError(f"{source}: missing keys {missing}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        try:
            return cls(**kw)
        except TaskError as e:
            raise TaskError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RecallTask:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(d, str(path))

    # ------------------------------------------------------------------ data
    def batch(self, n_seq: int, length: int, gen: torch.Generator, distractor_density: float = 0.0,
              needle_depth: float | None = None, pairs: int | None = None, queries: int | None = None):
        """(x (B, n), targets (B, n) with -100 off the answer positions, pair_pos (B, Q)): the position
        of each query's planted key (its value sits at pair_pos + 1)."""
        P = self.pairs if pairs is None else pairs
        Q = self.queries if queries is None else queries
        if length < layout_length(P, Q):
            raise TaskError(f"length {length} is too short for {P} pairs and {Q} queries")
        H = length - 1 - 2 * Q                               # haystack tokens
        n_slots = H - P                                      # filler slots once pairs take 2 tokens each
        kl, kh = self.key_ids
        vl, vh = self.value_ids
        fl, fh = self.filler_ids
        x = torch.empty(n_seq, length, dtype=torch.long)
        y = torch.full((n_seq, length), -100, dtype=torch.long)
        pair_pos = torch.empty(n_seq, Q, dtype=torch.long)
        for b in range(n_seq):
            keys = kl + torch.randperm(kh - kl, generator=gen)[:P]
            vals = torch.randint(vl, vh, (P,), generator=gen)
            # Pairs occupy P of the n_slots "slots" of a haystack in which each pair counts as one
            # slot; expanding pairs to 2 tokens gives non-overlapping adjacent (key, value) tokens.
            if needle_depth is not None and P == 1:
                slots = torch.tensor([min(n_slots - 1, int(needle_depth * n_slots))])
            else:
                slots = torch.randperm(n_slots, generator=gen)[:P].sort().values
            hay = torch.randint(fl, fh, (H,), generator=gen)
            is_pair = torch.zeros(n_slots, dtype=torch.bool)
            is_pair[slots] = True
            # token position of slot s = s + (number of pairs before s)
            before = torch.cumsum(is_pair.long(), 0) - is_pair.long()
            starts = slots + before[slots]
            if distractor_density > 0:
                free = torch.ones(H, dtype=torch.bool)
                free[starts] = False
                free[starts + 1] = False
                cand = torch.nonzero(free[:-1] & free[1:]).squeeze(1)
                n_d = min(int(round(distractor_density * H)), len(cand) // 3)
                if n_d > 0:
                    pick = cand[torch.randperm(len(cand), generator=gen)[: 3 * n_d]]
                    pick = pick.sort().values
                    taken = torch.zeros(H + 1, dtype=torch.bool)
                    chosen = []
                    for p in pick.tolist():          # keep non-overlapping ones
                        if not taken[p] and not taken[p + 1] and (p == 0 or not taken[p - 1]):
                            chosen.append(p)
                            taken[p] = taken[p + 1] = True
                            if len(chosen) == n_d:
                                break
                    others = torch.tensor(sorted(set(range(kl, kh)) - set(keys.tolist())))
                    if len(chosen) and len(others):
                        cp = torch.tensor(chosen)
                        hay[cp] = others[torch.randint(0, len(others), (len(cp),), generator=gen)]
                        hay[cp + 1] = torch.randint(vl, vh, (len(cp),), generator=gen)
            hay[starts] = keys
            hay[starts + 1] = vals
            q_idx = torch.randperm(P, generator=gen)[:Q]
            tail = torch.stack([keys[q_idx], vals[q_idx]], 1).reshape(-1)
            x[b, 0] = self.bos_id
            x[b, 1:1 + H] = hay
            x[b, 1 + H:] = tail
            ans = 1 + H + 2 * torch.arange(Q)                 # query-key positions
            y[b, ans] = vals[q_idx]
            pair_pos[b] = 1 + starts[q_idx]
        return x, y, pair_pos

    def answer_positions(self, length: int, queries: int | None = None) -> torch.Tensor:
        Q = self.queries if queries is None else queries
        return length - 2 * Q + 2 * torch.arange(Q)


def layout_length(pairs: int, queries: int) -> int:
    """Fewest tokens the layout holds: BOS, `pairs` planted (key, value) pairs, `queries` (key, value)
    pairs at the end, and one filler token."""
    return 1 + 2 * pairs + 2 * queries + 1


def answer_loss(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on answer positions only (targets -100 elsewhere)."""
    mask = y_BT >= 0
    return torch.nn.functional.cross_entropy(logits_BTV[mask].float(), y_BT[mask])


def task_for_model(model) -> RecallTask:
    """The RecallTask of a recall-trained checkpoint: `task.json` beside its weights (bundled `tiny-irope`
    or any exported run); a clear error for models trained on something else."""
    from workbench.bundled import resolve_source

    src = getattr(model, "source", None)
    path = Path(str(resolve_source(src))) / "task.json" if src is not None else None
    if path is None or not path.is_file():
        raise TaskError(f"model {src!r} has no task.json beside its weights: it was not trained on the recall "
                        "task (load 'tiny-irope', or export a recall run with `workbench experiment export`)")
    return RecallTask.load(path)
