"""The workbench app under concurrent use: N gradio_client users × M requests each, a mix of live runs
(prompt → forward pass → new run) and views, against a real server on a free local port.

    python benchmarks/load.py                  # N=16, M=24: `workbench app` in a subprocess; writes the
                                               #   "load" section of docs/reliability.md
    python benchmarks/load.py --quick          # N=2, M=4; prints, writes nothing
    python benchmarks/load.py -n 16 -m 20      # any size

Checked on every response: it arrived (errors are counted, with their messages), and a user's token
view shows that user's own live run — never another user's. Reported: N, M, errors, p50/p95/max
latency overall and per request kind, the server's RSS before, during (peak) and after.
tests/test_load.py runs `drive` at a small size against an in-process server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "example.zarr"
EXAMPLE_TEXT = "The example run, shared by every user."
# One user's sequence, cycled: a live run first, so the token views have the user's own run to show.
MIX = ("live", "tokens", "entropy_profile", "runs", "open_example", "tokens", "token_path", "mask", "open_own",
       "tokens", "params", "live")


@dataclass
class LoadResult:
    n_clients: int
    m_requests: int
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    isolation_checks: int = 0
    wall_s: float = 0.0

    @property
    def all_latencies(self) -> list[float]:
        return [t for ts in self.latencies.values() for t in ts]

    @property
    def answered(self) -> int:
        return len(self.all_latencies)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def _value(x):
    """A component update (value + new properties) or a plain value."""
    return x["value"] if isinstance(x, dict) and x.get("__type__") == "update" else x


def _marker(i: int) -> str:
    return f"user{i:03d}"


def _client(url: str, i: int, m: int, result: LoadResult, lock: threading.Lock, barrier: threading.Barrier):
    from gradio_client import Client

    c = Client(url, verbose=False)
    barrier.wait()                               # all users start together
    own, current, said = None, None, None        # own run name; the run this session shows; own prompt

    def check_tokens(hl):
        text = "".join(item["token"] for item in _value(hl))
        want = said if current == own else EXAMPLE_TEXT[:20]
        others = set(re.findall(r"user\d{3}", text)) - {_marker(i)}
        if want not in text or others:
            raise AssertionError(f"{_marker(i)} expected its run {current!r} ({want!r}), saw {text[:80]!r}")

    for j in range(m):
        kind = MIX[j % len(MIX)]
        t0 = time.perf_counter()
        try:
            if kind == "live":
                said = f"{_marker(i)} says {'abc'[j % 3] * 3} (request {j})"
                _, pick, text, _ = c.predict(said, 0, api_name="/live")
                own = current = _value(pick)
                assert text.endswith(said), text
            elif kind == "tokens":
                hl, *_ = c.predict(document=0, first_token=0, n_tokens=64, moe_layer=0, api_name="/tokens")
                check_tokens(hl)
                with lock:
                    result.isolation_checks += 1
            elif kind == "entropy_profile":
                fig = c.predict(layers="kind:nope-global", head_index="all", statistic="entropy", n_bins=64,
                                api_name="/entropy_profile")
                assert "entropy" in json.loads(fig["plot"])["layout"]["title"]["text"]
            elif kind == "runs":
                df, _ = c.predict(api_name="/runs")
                assert own not in [r[0] for r in df["data"]]    # a session's live run is private to it
            elif kind in ("open_example", "open_own"):
                name = EXAMPLE if kind == "open_example" else own
                assert name.split("/")[-1] in c.predict(name, api_name="/open_run")
                current = name
            elif kind == "token_path":
                _, table = c.predict(3, api_name="/token_path")
                assert "token #3" in table
            elif kind == "mask":
                c.predict(32, 8, api_name="/mask")
            elif kind == "params":
                md, _ = c.predict(preset_name="scout", experts=16, top_k=1, api_name="/params")
                assert "scout" in md
        except Exception as e:                   # noqa: BLE001 — every failure is counted and reported
            with lock:
                result.errors.append(f"{_marker(i)} request {j} ({kind}): {type(e).__name__}: {str(e)[:200]}")
            continue
        with lock:
            result.latencies[kind].append(time.perf_counter() - t0)


def drive(url: str, n_clients: int, m_requests: int) -> LoadResult:
    """N concurrent users, each a gradio_client session issuing M requests back to back."""
    result, lock = LoadResult(n_clients, m_requests), threading.Lock()
    barrier = threading.Barrier(n_clients + 1)
    threads = [threading.Thread(target=_client, args=(url, i, m_requests, result, lock, barrier), daemon=True)
               for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - t0
    return result


class RssSampler:
    """Peak resident memory of process `pid`, sampled every `every` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(pid), every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def summary_rows(r: LoadResult) -> list[list]:
    rows = []
    for kind in sorted(r.latencies, key=lambda k: -len(r.latencies[k])):
        ts = r.latencies[kind]
        rows.append([kind, len(ts), f"{percentile(ts, 50) * 1e3:.0f}", f"{percentile(ts, 95) * 1e3:.0f}",
                     f"{max(ts) * 1e3:.0f}"])
    ts = r.all_latencies
    rows.append(["**all**", len(ts), f"**{percentile(ts, 50) * 1e3:.0f}**", f"**{percentile(ts, 95) * 1e3:.0f}**",
                 f"{max(ts) * 1e3:.0f}" if ts else "–"])
    return rows


# ------------------------------------------------------------------------------------- the benchmark
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`workbench app` exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the app did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--clients", type=int, default=16)
    ap.add_argument("-m", "--requests", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="N=2, M=4, print only")
    args = ap.parse_args()
    n, m = (2, 4) if args.quick else (args.clients, args.requests)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine_info, markdown_table, write_section

    import workbench

    runs = Path(tempfile.mkdtemp(prefix="wb-load-"))
    workbench.record(workbench.load_model("tiny"), [{"text": EXAMPLE_TEXT, "id": "example"}], runs / EXAMPLE,
                     probes=("router", "router_logits", "entropy"), progress=False, model_source="tiny")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    # the real entry point, default host: what a user starts
    server = subprocess.Popen([sys.executable, "-m", "workbench", "app", "--runs", str(runs), "--model", "tiny",
                               "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(port, server)
        url = f"http://127.0.0.1:{port}/"
        with RssSampler(server.pid) as mem:
            drive(url, 1, 2)                      # warm-up: first live run, caches, lazy imports
            before = mem.rss()
            result = drive(url, n, m)
            after = mem.rss()
            peak = mem.peak
    finally:
        server.terminate()
        server.wait(timeout=30)

    mib = 2**20
    rows = summary_rows(result)
    table = markdown_table(["request", "count", "p50 ms", "p95 ms", "max ms"], rows)
    info = machine_info()
    body = "\n".join([
        f"`python benchmarks/load.py -n {n} -m {m}` — {n} concurrent gradio_client users × {m} requests "
        f"(mix cycled per user: {', '.join(MIX)}), server `workbench app --model tiny` on 127.0.0.1.",
        "",
        f"- requests: {n * m}, answered: {result.answered}, **errors: {len(result.errors)}**",
        f"- isolation: {result.isolation_checks} token views checked, each showed only its own user's run",
        f"- wall time {result.wall_s:.1f} s, throughput {result.answered / result.wall_s:.1f} requests/s",
        f"- server RSS: {before / mib:.0f} MiB after warm-up, peak {peak / mib:.0f} MiB, "
        f"{after / mib:.0f} MiB after ({(after - before) / mib:+.0f} MiB)",
        f"- machine: {info['cpu']}, {info['logical cpus']} logical CPUs, load average at start "
        f"{info['load average at start']}; commit {info['commit']}",
        "",
        table,
    ] + ([f"\nErrors: {result.errors[:5]}"] if result.errors else []))
    print(body)
    if not args.quick:
        write_section("load", body, "Reliability and security", REPO / "docs" / "reliability.md")
        print("wrote docs/reliability.md")


if __name__ == "__main__":
    main()
