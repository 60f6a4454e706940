"""Recording inputs and resume (issue 17, audit): resume compares content, not just ids; documents are
read as the user meant them (a bare string is one document, numpy id arrays are token ids); every
malformed input names its argument, file and line. Hypothesis drives the JSONL cases.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench
from workbench.cli import main
from workbench.recording import read_inputs, record
from workbench.store import open_run


@pytest.fixture(scope="module")
def tiny():
    return workbench.load_model("tiny")


def cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def clean(code, err, pattern):
    assert code == 2 and "Traceback" not in err and re.search(pattern, err), (code, err)


# ----------------------------------------------------------------------------- resume compares content
def test_resume_reports_recorded_skipped_and_refuses_changed_jsonl_text(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "r.zarr"
    src.write_text('{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta"}\n')
    code, stdout, _ = cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"], capsys)
    assert code == 0 and "2 recorded, 0 skipped (already present), 0 conflicting" in stdout
    src.write_text('{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta"}\n{"id": "c", "text": "gamma"}\n')
    code, stdout, _ = cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"], capsys)
    assert code == 0 and "1 recorded, 2 skipped (already present), 0 conflicting" in stdout
    before = open_run(out).attrs["input_hash"]
    src.write_text('{"id": "a", "text": "ALPHA changed"}\n{"id": "b", "text": "beta"}\n{"id": "d", "text": "x"}\n')
    code, _, err = cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"], capsys)
    clean(code, err, r"1 input document\(s\) differ from what this run recorded under the same id \(id 'a': ")
    assert "0 recorded, 1 skipped (already present), 1 conflicting" in err
    run = open_run(out)                         # nothing recorded: 'd' is not there either
    assert run.n_docs == 3 and run.attrs["input_hash"] == before


def test_resume_with_a_line_inserted_into_a_txt_input_is_refused(tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "r.zarr"
    src.write_text("first line\nsecond line\n")
    assert cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"], capsys)[0] == 0
    src.write_text("first line\nINSERTED\nsecond line\n")          # ids are line indices: '1' changed
    code, _, err = cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"], capsys)
    clean(code, err, r"id '1': .*inserting a line renumbers")
    assert open_run(out).n_docs == 2


def test_resume_refuses_a_changed_domain(tiny, tmp_path):
    out = tmp_path / "r.zarr"
    record(tiny, [{"id": "a", "text": "x", "domain": "arxiv"}], out, progress=False)
    with pytest.raises(ValueError, match=r"domain 'c4' in the input, 'arxiv' in the run"):
        record(tiny, [{"id": "a", "text": "x", "domain": "c4"}], out, progress=False)


def test_resume_stats_from_the_api(tiny, tmp_path):
    out, stats = tmp_path / "r.zarr", {}
    record(tiny, ["a b", "c d"], out, progress=False, stats=stats)
    assert (stats["recorded"], stats["skipped"]) == (2, 0)
    record(tiny, ["a b", "c d", "e"], out, progress=False, stats=stats)
    assert (stats["recorded"], stats["skipped"], stats["conflicting"]) == (1, 2, 0)


# ----------------------------------------------------------------------------- what a document is
def test_a_bare_string_is_one_document(tiny, tmp_path):
    run = open_run(record(tiny, "hello world", tmp_path / "r.zarr", progress=False))
    assert run.n_docs == 1 and run.tokens(0).tolist() == tiny.tokenizer.encode("hello world")


def test_numpy_and_list_token_ids_record_the_same(tiny, tmp_path):
    ids = [256, 104, 105, 33]
    a = open_run(record(tiny, [ids], tmp_path / "a.zarr", progress=False))
    b = open_run(record(tiny, [np.array(ids, dtype=np.int64)], tmp_path / "b.zarr", progress=False))
    c = open_run(record(tiny, np.array([ids, ids[::-1]], dtype=np.int32), tmp_path / "c.zarr", progress=False))
    d = open_run(record(tiny, ids, tmp_path / "d.zarr", progress=False))          # flat ids: one document
    assert a.tokens(0).tolist() == b.tokens(0).tolist() == c.tokens(0).tolist() == d.tokens(0).tolist() == ids
    assert c.n_docs == 2 and d.n_docs == 1
    np.testing.assert_array_equal(a.read("router/experts"), b.read("router/experts"))


@pytest.mark.parametrize("inputs,kwargs,pattern", [
    (["x"], {"probes": "router"}, r"probes must be a sequence of probe names, e.g. \('router',\)"),
    (["x"], {"probes": ()}, "probes is empty"),
    (["x"], {"probes": ("router", 3)}, "probes must be probe names"),
    ([[1.0, 2.0]], {}, r"input 0 \(id 0\): 'tokens' must be a list of integer token ids; position 0 holds float"),
    ([np.array([1.5, 2.0])], {}, r"input 0 .*1-D integer array, got dtype float64"),
    ([[True, False]], {}, r"position 0 holds bool"),
    ([[2 ** 70]], {}, r"token id 1180591620717411303424 is out of range for vocab_size=384"),
    ([{"text": "a", "tokens": [1]}], {}, r"input 0: has both 'text' and 'tokens'"),
    ([{"text": "a", "id": None}], {}, r"input 0: 'id' must be a string or an integer, got NoneType"),
    ([{"text": "a", "id": [1, 2]}], {}, r"'id' must be a string or an integer, got list"),
    ([{"text": "a", "id": 10 ** 40}], {}, r"integer 'id' is too large"),
    ([{"text": "\ud800"}], {}, r"input 0: 'text' holds an unpaired surrogate"),
    (["x"], {"segment": 0}, "segment must be a positive number"),
    (["x"], {"flush_tokens": 0}, "flush_tokens must be a positive number"),
    (3.5, {}, "inputs must be a string, a dict, token ids or a sequence"),
])
def test_api_errors_name_the_argument(tiny, tmp_path, inputs, kwargs, pattern):
    out = tmp_path / "r.zarr"
    with pytest.raises((ValueError, TypeError), match=pattern):
        record(tiny, inputs, out, progress=False, **kwargs)
    assert not out.exists()


# ----------------------------------------------------------------------------- the CLI, with file and line
@pytest.mark.parametrize("content,pattern", [
    ('{"text": "ok"}\n{"text": "a", "tokens": [1]}\n', r"in\.jsonl:2: has both 'text' and 'tokens'"),
    ('{"text": "ok"}\n{"text": "a", "id": null}\n', r"in\.jsonl:2: 'id' must be a string or an integer, got NoneType"),
    ('{"text": "a", "id": [1]}\n', r"in\.jsonl:1: 'id' must be a string or an integer, got list"),
    ('{"text": "a", "id": ' + "9" * 40 + "}\n", r"in\.jsonl:1: integer 'id' is too large"),
    ('{"text": "a", "id": ' + "9" * 5000 + "}\n", r"in\.jsonl:1: unreadable JSON"),
    ('{"tokens": [1, ' + "9" * 40 + "]}\n", r"in\.jsonl:1: token id 9{12}… \(40 digits\) is out of range for int32"),
    ('{"text": "\\ud800 lone"}\n', r"in\.jsonl:1: 'text' holds an unpaired surrogate"),
    ('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n", r"in\.jsonl:1: JSON nested too deeply"),
    ('{"tokens": [1.7, 2]}\n', r"in\.jsonl:1: 'tokens' must be a list of integer token ids; position 0 holds float"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, capsys, content, pattern):
    src, out = tmp_path / "in.jsonl", tmp_path / "r.zarr"
    src.write_text(content)
    clean(*[v for i, v in enumerate(cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet"],
                                        capsys)) if i != 1], pattern)
    assert not out.exists()


@pytest.mark.parametrize("extra,pattern", [
    (["--probes", ""], r"--probes '': no probes"),
    (["--probes", "router,bogus"], r"--probes 'router,bogus': unknown probes \['bogus'\]"),
    (["--flush-tokens", "0"], "--flush-tokens must be a positive number of tokens, got 0"),
    (["--segment", "-5"], "--segment must be a positive number of tokens, got -5"),
])
def test_record_option_errors(tmp_path, capsys, extra, pattern):
    src, out = tmp_path / "in.txt", tmp_path / "r.zarr"
    src.write_text("hello\n")
    code, _, err = cli(["record", "--model", "tiny", "--input", src, "--out", out, "--quiet", *extra], capsys)
    clean(code, err, pattern)
    assert not out.exists()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 80, 2 ** 80) | st.floats() | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["text", "tokens", "id", "domain", "other"]), json_values, max_size=4))
def test_fuzzed_jsonl_lines_are_read_or_refused_with_the_line(tmp_path, fields):
    """Any JSON object on line 2: read_inputs accepts it or raises ValueError naming in.jsonl:2."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n' + json.dumps(fields) + "\n")
    try:
        docs = read_inputs(src)
    except ValueError as e:
        assert "in.jsonl:2" in str(e), e
        return
    assert len(docs) == 2 and isinstance(docs[1], dict)


def test_streamed_resume_compares_content_too(tmp_path):
    """`record --streamed` (and --dp / --ep, through distributed._done_ids) refuse a changed document."""
    from workbench.checkpoint import build_model, save_model
    from workbench.config import preset
    from workbench.streamed import streamed_record

    ck = save_model(build_model(preset("tiny")), tmp_path / "ck")
    out = tmp_path / "s.zarr"
    streamed_record(ck, [{"id": "a", "tokens": [256, 1, 2, 3]}], out, progress=False)
    streamed_record(ck, [{"id": "a", "tokens": [256, 1, 2, 3]}, {"id": "b", "tokens": [256, 9]}], out,
                    progress=False)
    assert open_run(out).n_docs == 2
    with pytest.raises(ValueError, match=r"id 'a': token 2 is 7 in the input, 2 in the run"):
        streamed_record(ck, [{"id": "a", "tokens": [256, 1, 7, 3]}], out, progress=False)
