"""benchmarks/throughput.py end to end at tiny sizes (no timing assertion: CI machines are noisy): every table is
printed, our greedy decode equals transformers' on the same weights, and --quick never rewrites the docs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import transformers  # noqa: F401  (dev dependency: missing must fail, not skip)
from conftest import REPO


def _only(table: str, *extra: str) -> str:
    """Run `throughput.py --quick --only <table>`; check it printed its block inside its own markers and
    left that block of docs/benchmarks.md as it was (only this block: others may edit the rest of the file
    meanwhile). Returns stdout."""
    docs = REPO / "docs" / "benchmarks.md"
    marks = (f"<!-- throughput-{table}:begin -->", f"<!-- throughput-{table}:end -->")

    def block():
        m = re.search(re.escape(marks[0]) + ".*?" + re.escape(marks[1]), docs.read_text(), re.S)
        return m and m.group(0)
    before = block()
    assert before, f"docs/benchmarks.md lost its throughput-{table} markers"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--only", table, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marks[0] in proc.stdout and marks[1] in proc.stdout
    assert block() == before
    return proc.stdout


@pytest.mark.slow  # four contestants at 256 tokens, quiet and contended; decode; prefill; store (~60-150 s)
def test_throughput_quick_prints_every_table():
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--threads", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| quiet | 256 |" in out and "| one core burnt by another process | 256 |" in out
    # greedy tokens equal HF's; one thread, per CPU second
    assert re.search(r"\| tiny-moe \| 1 \| CPU time \| 32 \| 8 \| .* \| 8/8 \|", out), out
    assert "| record, background writer | 256 |" in out and "| record, inline writer | 256 |" in out
    assert re.search(r"\| scout-shaped \| 128 \| .* \*\*\d+%\*\* \|", out)
    assert "wrote" not in out


def test_only_store_quick_prints_the_store_block_and_leaves_the_docs():
    out = _only("store")
    # both routes, alternating (256 tokens) and one run (4x); the direct share is a percentage in both
    for route in ("record, background writer", "record, inline writer"):
        assert re.search(rf"\| {route} \| 256 \|.*\*\*\d+\.\d%\*\* \| \*\*\d+\.\d%\*\* \|", out), out
        assert re.search(rf"\| {route} \(one run\) \| 1024 \|.*\*\*\d+\.\d%\*\* \|", out), out
    assert "| quiet |" not in out and "tiny-moe" not in out     # the other tables did not run


def test_only_peers_quick_prints_the_peers_block_and_leaves_the_docs():
    """--only peers: the peers' row alone (quiet and with one core burnt; record / bare in wall and CPU time)."""
    out = _only("peers")
    for state in ("quiet", "one core burnt by another process"):
        assert re.search(rf"\| {state} \| 256 \| .* \| \*\*\d+\.\d\d×\*\* \| \d+\.\d\d× \| .*\|$", out, re.M), out
    assert "tiny-moe" not in out and "record, inline writer" not in out      # the other tables did not run


def test_only_decode_quick_prints_the_decode_block_and_leaves_the_docs():
    """--only decode: plain vs recorded vs transformers decoding on tiny-moe alone, greedy tokens equal to
    transformers'."""
    out = _only("decode", "--threads", "1")
    assert re.search(r"\| tiny-moe \| 1 \| CPU time \| 32 \| 8 \| \d+ \| \d+ \| \*\*\d+\.\d\d×\*\* \| \d+ \| "
                     r"\*\*\d+\.\d×\*\* \| 8/8 \|", out), out
    assert "| quiet |" not in out and "record, inline writer" not in out     # the other tables did not run
