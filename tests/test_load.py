"""The app under concurrent use, and the security properties only a running server can show.

Load: N gradio_client users × M mixed requests (live runs and views, benchmarks/load.py `drive`)
against a real server on a free local port: all answered, no user sees another's run, memory
bounded. The bigger run is `python benchmarks/load.py` (figures in docs/reliability.md).

Security on the live server: it listens on 127.0.0.1 only (a connection to this machine's other
addresses is refused), uploads over 10 MB are refused, the file route serves nothing from the
runs directory or elsewhere, and XSS payloads in a run name or a prompt come back escaped.
"""

from __future__ import annotations

import html
import socket
import urllib.error
import urllib.request
import uuid

import pytest

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")
psutil = pytest.importorskip("psutil")

import workbench  # noqa: E402
from apps.workbench_app import build_app, serve  # noqa: E402
from benchmarks.load import EXAMPLE, EXAMPLE_TEXT, RssSampler, drive, percentile, summary_rows  # noqa: E402

pytestmark = pytest.mark.slow          # a real server, a model and ~40 requests: ~40 s on two shared cores
XSS = "<img src=x onerror=alert(1)>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = workbench.load_model("tiny")
    runs = tmp_path_factory.mktemp("runs")
    for name in (EXAMPLE, f"{XSS}.zarr"):
        workbench.record(model, [{"text": EXAMPLE_TEXT, "id": "example"}], runs / name,
                         probes=("router", "router_logits", "entropy"), progress=False, model_source="tiny")
    demo = build_app(model, runs, model_source="tiny")
    port = free_port()
    _, url, _ = serve(demo, "127.0.0.1", port, share=False, block=False)
    yield url, port, runs
    demo.close()


def test_concurrent_users_all_answered_isolated_and_memory_bounded(app):
    url, _, _ = app
    n, m = 3, 8
    with RssSampler(psutil.Process().pid) as mem:
        drive(url, 1, 3)                                # warm-up: first live run, caches, lazy imports
        before = mem.rss()
        result = drive(url, n, m)
        after = mem.rss()
    lat = result.all_latencies
    print(f"\n[load] N={n} M={m}: {result.answered}/{n * m} answered, {len(result.errors)} errors, "
          f"{result.isolation_checks} isolation checks, p50 {percentile(lat, 50) * 1e3:.0f} ms, "
          f"p95 {percentile(lat, 95) * 1e3:.0f} ms, RSS {before / 2**20:.0f} → {after / 2**20:.0f} MiB "
          f"(peak {mem.peak / 2**20:.0f} MiB)")
    for row in summary_rows(result):
        print("  ", row)
    assert not result.errors, result.errors
    assert result.answered == n * m and result.isolation_checks >= n * 2
    # caches are bounded (16 runs, 128 views) and each live run is a few KB: growth stays well under this
    assert after - before < 300 * 2**20, (before, after)


# ------------------------------------------------------------------------------------- security
def test_server_listens_on_loopback_only(app):
    _, port, _ = app
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [a.ip for a in listening] == ["127.0.0.1"], listening
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:                             # from this machine's other interfaces: refused
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def _upload(url: str, n_bytes: int) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * n_bytes + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "gradio_api/upload", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_uploads_over_10_mb_are_refused(app):
    url, _, _ = app
    assert _upload(url, 1000) == 200
    assert _upload(url, 10 * 2**20 + 1) == 413


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_file_route_serves_nothing_outside_gradios_own_files(app):
    url, _, runs = app
    for target in ("/etc/passwd", "../../../../etc/passwd", str(runs / EXAMPLE / "zarr.json"), "README.md",
                   "/tmp/gradio/../../etc/passwd"):
        assert _get(url + "gradio_api/file=" + urllib.request.quote(target)) == 403, target


def test_xss_payloads_come_back_escaped(app):
    url, _, _ = app
    c = gradio_client.Client(url, verbose=False)
    df, _ = c.predict(api_name="/runs")
    assert f"{XSS}.zarr" in [r[0] for r in df["data"]]           # listed as data, a plain string
    summary = c.predict(f"{XSS}.zarr", api_name="/open_run")
    assert html.escape(XSS) in summary and XSS not in summary
    _, _, text, summary = c.predict(f"hi {XSS} <script>alert(2)</script>", 0, api_name="/live")
    assert text.endswith("<script>alert(2)</script>")          # a Textbox value: shown as text, not HTML
    assert "<script" not in summary and "<img" not in summary
    _, table = c.predict(4, api_name="/token_path")              # token 4 is the payload's "<"
    assert "&#x27;&lt;&#x27;" in table and "'<'" not in table
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        c.predict(f"../{XSS}", api_name="/open_run")
    assert "Invalid run name" in str(e.value) and XSS not in str(e.value)
