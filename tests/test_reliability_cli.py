"""`workbench` subcommand options under bad input (issue 17, audit): each is one `error:` line naming
the option and value, exit status 2, no traceback, and — checked before any work — nothing trained,
created or written.
"""

from __future__ import annotations

import json
import time

import pytest
from test_reliability_inputs import assert_clean_error, cli  # noqa: E402  (same CLI helpers)


@pytest.mark.parametrize("argv,pattern", [
    (["train", "run", "--out", "{tmp}/m", "--steps", "-1"], r"--steps must be ≥ 1, got -1"),
    (["train", "run", "--out", "{tmp}/m", "--batch-size", "0"], r"--batch-size must be ≥ 1, got 0"),
    (["train", "run", "--out", "{tmp}/m", "--seq-len", "0"], r"--seq-len must be ≥ 1, got 0"),
    (["train", "run", "--out", "{tmp}/m", "--seed", "9" * 40], r"--seed must be in \[0, 9223372036854775807\], "
                                                                r"got 99999999… \(40 digits\)"),
    (["train", "run", "--out", "{tmp}/m", "--lr", "nan"], "--lr must be a finite number > 0.0, got nan"),
    (["train", "run", "--out", "{tmp}/m", "--heldout-frac", "1.5"], "--heldout-frac must lie strictly between"),
    (["train", "run", "--out", "{tmp}/m", "--kv-weight", "-0.1"], "--kv-weight must lie strictly between"),
    (["train", "run", "--out", "{tmp}/m", "--vocab-size", "100"], r"--vocab-size must be in \[384, "),
    (["train", "run", "--out", "{tmp}/file"], r"--out .*file is an existing file"),
    (["train", "vlm", "--out", "{tmp}/m", "--steps", "-5"], r"--steps must be ≥ 1, got -5"),
    (["train", "vlm", "--out", "{tmp}/m", "--batch-size", "-1"], r"--batch-size must be ≥ 1, got -1"),
    (["train", "vlm", "--out", "{tmp}/m", "--vision-steps", "-1"], r"--vision-steps must be ≥ 0"),
    (["train", "eval-vlm", "{tmp}/m", "--ig-steps", "0"], r"--ig-steps must be ≥ 1"),
    (["attribute", "--model", "tiny-vision", "--prompt", "<|image|>", "--image", "x.png", "--out", "{tmp}/a.zarr",
      "--steps", "0"], "--steps must be a positive number of IG steps, got 0"),
    (["app", "--port", "-1"], r"--port must be a TCP port in 1..65535, got -1"),
    (["app", "--port", "70000"], r"--port must be a TCP port in 1..65535, got 70000"),
    (["app", "--runs", "{tmp}/typo"], r"--runs .*typo: no such directory"),
    (["plan", "tiny", "--probes", "bogus"], r"--probes 'bogus': unknown probes \['bogus'\]"),
    (["plan", "tiny", "--probes", ""], r"--probes '': no probes"),
    (["plan", "tiny", "--batch-tokens", "-1"], "--batch-tokens must be a positive number of tokens, got -1"),
    (["plan", "tiny", "--tokens", "0"], "--tokens must be a positive number of tokens, got 0"),
], ids=lambda x: " ".join(x)[:50] if isinstance(x, list) else None)
def test_option_errors_are_one_line_before_any_work(argv, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.perf_counter()
    assert_clean_error(*cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys), pattern)
    assert time.perf_counter() - t0 < 30, "the option must be refused before training or loading"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be created"


def test_eval_vlm_on_a_text_model_is_a_clear_error(capsys):
    assert_clean_error(*cli(["train", "eval-vlm", "tiny-moe", "--eval-questions", "1"], capsys),
                       r"tiny-moe: a text-only model; eval-vlm evaluates a vision-language model")


def test_resuming_with_another_vocab_size_is_refused(tmp_path):
    from workbench.tokenizer import byte_tokenizer
    from workbench.train.recipe import get_tokenizer

    work = tmp_path / "work"
    work.mkdir()
    byte_tokenizer(128).save(str(work / "tokenizer.json"))
    (work / "tokenizer_settings.json").write_text(json.dumps({"vocab_size": 4096}))
    with pytest.raises(ValueError, match=r"trained with --vocab-size 4096; resuming it with --vocab-size 512 "
                                         r"would silently keep 4096"):
        get_tokenizer({}, work, 512, 0)
    assert get_tokenizer({}, work, 4096, 0).get_vocab_size() == 384       # the same size resumes


def test_attribute_out_into_a_run_of_another_model(tmp_path, capsys):
    import workbench
    from workbench.recording import record

    run = record(workbench.load_model("tiny"), ["some text"], tmp_path / "text.zarr", progress=False)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (20, 20), "red").save(img)
    assert_clean_error(*cli(["attribute", "--model", "tiny-vision", "--prompt", "<|image|> colour?", "--image", img,
                             "--out", run, "--method", "gxi", "--quiet"], capsys),
                       r"--out .*text\.zarr is a run recorded from another model \('tiny'")
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
