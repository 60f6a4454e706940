"""Resume by content: which input documents a run already holds, which it lacks, and which it holds
under the same id with different content.

    plan = plan_resume("run.zarr", docs)     # docs: [{"tokens": [...], "doc_id": "a", "domain": ""}, ...]
    plan.raise_on_conflict()                 # ValueError naming the conflicting ids
    plan.todo, plan.skipped, plan.conflicts, plan.summary(recorded=n)

A resumed run must equal an uninterrupted one. Skipping by id alone keeps a stale recording when a
JSONL document's text changed, and with `.txt` input (ids are line numbers) a line inserted above the
recorded ones shifts every id, so the run would silently hold the old documents under the new ids.
Here a document whose id the run holds is compared with what the run recorded — its token ids (the
run's config hash is already checked, so equal tokens mean equal inputs) and its domain — and a
mismatch is a conflict: nothing is recorded, and the error names the ids and the first difference.

Cost: one read of the run's committed `tokens` and `doc_id` (4 bytes a token), only when resuming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ResumePlan:
    out: Path
    todo: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # ids already present with equal content
    conflicts: list[tuple[str, str]] = field(default_factory=list)   # (id, what differs)

    def summary(self, recorded: int) -> str:
        return (f"{recorded} recorded, {len(self.skipped)} skipped (already present), "
                f"{len(self.conflicts)} conflicting")

    def raise_on_conflict(self) -> None:
        if not self.conflicts:
            return
        shown = "; ".join(f"id {i!r}: {why}" for i, why in self.conflicts[:5])
        more = f"; and {len(self.conflicts) - 5} more" if len(self.conflicts) > 5 else ""
        raise ValueError(
            f"{self.out}: {len(self.conflicts)} input document(s) differ from what this run recorded under "
            f"the same id ({shown}{more}). Nothing was recorded ({self.summary(0)}). A run holds one "
            "recording per id: record into a new --out, or give changed documents new ids (with .txt "
            "input the id is the line's index, so inserting a line renumbers the ones after it)")


def _difference(stored: np.ndarray, tokens: list[int]) -> str:
    given = np.asarray(tokens, dtype=np.int64)
    if len(stored) != len(given):
        return f"the run holds {len(stored)} tokens, the input has {len(given)}"
    first = int(np.flatnonzero(stored != given)[0])
    return f"token {first} is {int(given[first])} in the input, {int(stored[first])} in the run"


def plan_resume(out, docs: list[dict]) -> ResumePlan:
    """Split `docs` (normalised: tokens, doc_id, domain) by what the run at `out` holds."""
    from workbench.store import open_run

    plan = ResumePlan(Path(out))
    if not Path(out).exists():
        plan.todo = list(docs)
        return plan
    run = open_run(out)
    if run.n_docs == 0:
        plan.todo = list(docs)
        return plan
    index = {str(v): i for i, v in enumerate(run.read("doc_id"))}
    present = [d for d in docs if d["doc_id"] in index]
    if present:
        tokens = run.read("tokens")
        domains = run.read("doc_domain")
    for d in docs:
        i = index.get(d["doc_id"])
        if i is None:
            plan.todo.append(d)
            continue
        stored = tokens[run.doc_slice(i)]
        if len(stored) != len(d["tokens"]) or not np.array_equal(stored, np.asarray(d["tokens"])):
            plan.conflicts.append((d["doc_id"], _difference(stored, d["tokens"])))
        elif str(domains[i]) != (d.get("domain") or ""):
            plan.conflicts.append((d["doc_id"], f"domain {d.get('domain')!r} in the input, {str(domains[i])!r} "
                                                "in the run"))
        else:
            plan.skipped.append(d["doc_id"])
    return plan
