"""The prefill benchmark runs end to end on tiny sizes (no timing assertion: CI machines are noisy)."""

from __future__ import annotations

import re
import subprocess
import sys

import transformers  # noqa: E402,F401  (dev dependency: missing must fail, not skip)
from conftest import REPO


def test_forward_benchmark_quick_runs_and_reports_a_ratio():
    proc = subprocess.run([sys.executable, "benchmarks/forward.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"ratio quick T=\d+: [\d.]+x vs HF sdpa", proc.stdout), proc.stdout
    assert "| config | tokens |" in proc.stdout           # the markdown table
    assert "wrote" not in proc.stdout                     # --quick never rewrites docs/benchmarks.md


def test_attribution_benchmark_quick_runs_and_prints_the_table():
    proc = subprocess.run([sys.executable, "benchmarks/attribution.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | threads | ours s | transformers+captum s |" in proc.stdout, proc.stdout
    assert "| IG (4 steps) |" in proc.stdout and "| tile occlusion |" in proc.stdout
    assert "wrote" not in proc.stdout                     # --quick never rewrites docs/benchmarks.md
