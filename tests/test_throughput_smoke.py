"""benchmarks/throughput.py end to end at tiny sizes (no timing assertion: CI machines are noisy): every table is
printed, our greedy decode equals transformers' on the same weights, and --quick never rewrites the docs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import transformers  # noqa: F401  (dev dependency: missing must fail, not skip)
from conftest import REPO


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
    docs = REPO / "docs" / "benchmarks.md"

    def block():                            # only this block: others may edit the rest of the file meanwhile
        m = re.search(r"<!-- throughput-store:begin -->.*?<!-- throughput-store:end -->", docs.read_text(), re.S)
        return m and m.group(0)
    before = block()
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--only", "store"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "<!-- throughput-store:begin -->" in out and "<!-- throughput-store:end -->" in out
    # both routes, alternating (256 tokens) and one run (4x); the direct share is a percentage in both
    for route in ("record, background writer", "record, inline writer"):
        assert re.search(rf"\| {route} \| 256 \|.*\*\*\d+\.\d%\*\* \| \*\*\d+\.\d%\*\* \|", out), out
        assert re.search(rf"\| {route} \(one run\) \| 1024 \|.*\*\*\d+\.\d%\*\* \|", out), out
    assert "| quiet |" not in out and "tiny-moe" not in out     # the other tables did not run
    assert block() == before


def test_only_peers_quick_prints_the_peers_block_and_leaves_the_docs():
    """--only peers: the peers' row alone (quiet and with one core burnt; record / bare in wall and CPU time),
    inside its own markers, and --quick leaves docs/benchmarks.md as it was."""
    docs = REPO / "docs" / "benchmarks.md"

    def block():                            # only this block: others may edit the rest of the file meanwhile
        m = re.search(r"<!-- throughput-peers:begin -->.*?<!-- throughput-peers:end -->", docs.read_text(), re.S)
        return m and m.group(0)
    before = block()
    assert before, "docs/benchmarks.md lost its throughput-peers markers"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--only", "peers"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "<!-- throughput-peers:begin -->" in out and "<!-- throughput-peers:end -->" in out
    for state in ("quiet", "one core burnt by another process"):
        assert re.search(rf"\| {state} \| 256 \| .* \| \*\*\d+\.\d\d×\*\* \| \d+\.\d\d× \| .*\|$", out, re.M), out
    assert "tiny-moe" not in out and "record, inline writer" not in out      # the other tables did not run
    assert block() == before


def test_only_decode_quick_prints_the_decode_block_and_leaves_the_docs():
    """--only decode: plain vs recorded vs transformers decoding on tiny-moe alone, greedy tokens equal to
    transformers', inside its own markers; --quick leaves docs/benchmarks.md as it was."""
    docs = REPO / "docs" / "benchmarks.md"

    def block():                            # only this block: others may edit the rest of the file meanwhile
        m = re.search(r"<!-- throughput-decode:begin -->.*?<!-- throughput-decode:end -->", docs.read_text(), re.S)
        return m and m.group(0)
    before = block()
    assert before, "docs/benchmarks.md lost its throughput-decode markers"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--only", "decode", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "<!-- throughput-decode:begin -->" in out and "<!-- throughput-decode:end -->" in out
    assert re.search(r"\| tiny-moe \| 1 \| CPU time \| 32 \| 8 \| \d+ \| \d+ \| \*\*\d+\.\d\d×\*\* \| \d+ \| "
                     r"\*\*\d+\.\d×\*\* \| 8/8 \|", out), out
    assert "| quiet |" not in out and "record, inline writer" not in out     # the other tables did not run
    assert block() == before
