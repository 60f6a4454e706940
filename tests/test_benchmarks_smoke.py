"""The benchmarks and the prepared GPU scripts run end to end on tiny sizes (no timing assertion: CI machines are
noisy)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
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


@pytest.mark.slow  # the GPU check end to end at tiny sizes on CPU: writes a checkpoint, streams and records (≈ 15 s)
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--workdir", str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["streamed_vs_in_memory"]["attention/entropy"]["bitwise_equal"]
    assert summary["streamed_vs_in_memory"]["router/experts"]["equal_fraction"] == 1.0
    assert summary["matmul_peak_tflops"] > 0
    for row in summary["prefill"].values():             # one row per document length
        assert row["router_entropy"]["tokens_per_s"] > 0 and 0 < row["router"]["fraction_of_matmul_peak"] < 1


@pytest.mark.slow  # int4 quantization end to end at tiny sizes on CPU: in place and via a checkpoint (≈ 15 s)
def test_gpu_quant_tiny_runs_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_quant.py", "--tiny", "--workdir", str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_quant.json").read_text())
    assert summary["via_checkpoint"]["logits_equal_in_place"]       # streamed quantization = in place
    mem = summary["memory"]
    assert mem["int4_weight_bytes"] == mem["planner_int4_bytes_this_model"] < mem["bf16_weight_bytes"]
    assert mem["full_scout_int4_on_h100-80gb"] == "in-memory"
    for row in summary["speed"].values():                            # bf16 and int4
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    routing = [r["routing_agree"] for r in summary["quality"] if r["routing_agree"] is not None]
    assert len(routing) == 3 and all(0.9 <= a <= 1 for a in routing)    # tiny: MoE layers 0, 1, 3
    assert "| variant | layer | routing agree |" in proc.stdout


@pytest.mark.slow  # writes 40k-token shards, starts a 2-process LocalCluster (≈ 30-80 s on a shared machine)
def test_analysis_scale_benchmark_quick_runs_cluster_and_threads_identical():
    proc = subprocess.run([sys.executable, "benchmarks/analysis_scale.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cluster and threaded identical" in proc.stdout, proc.stdout
    assert "wrote" not in proc.stdout                     # --quick never rewrites docs/benchmarks.md


@pytest.mark.slow  # three layer sizes × four paths + the peers' model at 256 tokens (~20-30 s on a shared CPU)
def test_attention_paths_quick_prints_both_tables():
    """benchmarks/attention_paths.py: per-layer CPU time of the statistics paths; its single-pass contender
    agrees with the tiled reference (the error column), and --quick never rewrites the docs."""
    proc = subprocess.run([sys.executable, "benchmarks/attention_paths.py", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (chunked|global) \| 256 \| .* \| ([\d.e+-]+) \|$", proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["chunked", "chunked", "global"], proc.stdout
    assert all(float(err) < 1e-4 for _, err in rows), rows                 # the contender computes the same thing
    assert "| bare forward (measured) |" in proc.stdout and "wrote" not in proc.stdout
