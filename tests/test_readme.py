"""The README's Python quick start runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_readme_quick_start_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))      # every block, in order
    assert "generate_recorded" in code and "load_model" in code
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "('moe_layer', 'token', 'k')" in res.stdout
    assert (tmp_path / "runs" / "gen.zarr").is_dir()


def test_readme_names_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_cli_help_everywhere():
    for args in ([], ["info"], ["generate"], ["record"], ["runs"], ["app"], ["train", "vlm"], ["train", "eval-vlm"]):
        res = subprocess.run([sys.executable, "-m", "workbench", *args, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage:" in res.stdout, (args, res.stderr)
