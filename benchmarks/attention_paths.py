"""Attention statistics on the CPU: which implementation is cheapest, per layer kind and size (issue 20).

    python benchmarks/attention_paths.py            # writes the "attention-paths" section of docs/benchmarks.md
    python benchmarks/attention_paths.py --quick    # seconds; CI smoke (never writes docs)

Recording router + entropy costs more than a bare forward because the statistics need more than the
attention output. This measures, on one thread in CPU time (`time.thread_time`, steadier than wall time on a
shared machine; contestants alternate, medians), one attention layer of the peers' shapes (4 query heads,
2 kv heads, head dim 64):

* `attend` — the bare forward's attention (flash SDPA, no statistics): the floor;
* `padded` — what `record` runs on fp32 models (attention_stats.py): one flash call with heads padded to
  2·Dh, q' = [q, 0], k' = [k, 0], v' = [v, k], returns the output and Σ a·k; a second call with q/β on NoPE
  layers past floor_scale (the temperature-off counterfactual);
* `fused` — what `record` runs on bf16 models (and on fp32 before): flash for the output + LSE, a second
  flash pass with V := centred K for Σ a·k, a third with q/β where temperature is on;
* `single pass` — the contender: one set of logits per block (a chunk, or 256 query rows × every visible
  key on a global layer; never T × T), softmax once, and output, entropy, first-token mass and the
  counterfactual (the same shifted logits × 1/β) read from it. GQA by reshaping query heads onto their kv
  head, no K/V copies. Defined here, not in the library: it lost at every size measured (see the table);
* `tiled` — the library's dense reference (attention_stats.py, any device);
* `flash 2·Dh` — the padded path's flash call alone (inputs prepared outside the clock): with `attend`
  it splits the kernel's time into a part that grows with the head size (the two matmuls) and a part
  that does not (softmax, exp, bookkeeping): b = 2·attend − flash 2·Dh. A kernel that accumulated Σ a·s
  next to the output inside the flash loop (what a GPU kernel does) would cost about `attend`, plus b
  for the counterfactual's second exp on NoPE layers: the "fused-kernel estimate" of the second table.

The whole-forward table measures the peers' 4-layer model (3 chunked + 1 global) bare and with statistics
by each path (`padded` and `fused` forced through attention.py), and projects each path from the layer
table: statistics cost = Σ over layers of (path − attend), over the bare forward's CPU time.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, pin_threads, time_alternating, write_section  # noqa: E402

from workbench.model.attention_kernel import _FLASH_CPU, attend  # noqa: E402
from workbench.model.attention_stats import attend_with_stats  # noqa: E402

MASKED = -1e30


def single_pass(q_BHTD, k_BHSD, v_BHSD, chunk: int | None, scale: float, beta_T, tq: int = 256):
    """Prefill from position 0: attention and its statistics from one set of logits per block of `tq`
    queries. Returns out (B, H, T, Dh), entropy, entropy without temperature, sink mass (B, H, T)."""
    B, H, T, Dh = q_BHTD.shape
    Hkv = k_BHSD.shape[1]
    G = H // Hkv
    tq = min(tq, chunk) if chunk else tq                                  # a block stays inside one chunk
    out = torch.empty(B, Hkv, G, T, Dh)
    ent, ent0, sink = torch.empty(B, Hkv, G, T), torch.empty(B, Hkv, G, T), torch.zeros(B, Hkv, G, T)
    tri = torch.full((tq, tq), MASKED).triu(1)
    inv_beta = None if beta_T is None else 1.0 / beta_T.float()
    qf = q_BHTD.float().reshape(B, Hkv, G, T, Dh)                         # query heads onto their kv head
    kf, vf = k_BHSD.float(), v_BHSD.float()
    for a in range(0, T, tq):
        b = min(T, a + tq)
        ka = (a // chunk) * chunk if chunk else 0
        s = torch.matmul(qf[:, :, :, a:b], kf[:, :, None, ka:b].transpose(-1, -2))    # (B, Hkv, G, tq, keys)
        s.mul_(scale)
        s[..., a - ka:].add_(tri[:b - a, :b - a])                          # causal on the diagonal block
        m = s.amax(-1, keepdim=True)
        s.sub_(m)
        e = torch.exp(s)
        l_ = e.sum(-1)
        out[:, :, :, a:b] = torch.matmul(e, vf[:, :, None, ka:b]) / l_[..., None]
        ent[:, :, :, a:b] = torch.log(l_) - torch.linalg.vecdot(e, s) / l_
        if ka == 0:
            sink[:, :, :, a:b] = e[..., 0] / l_
        ib = None if inv_beta is None else inv_beta[a:b]
        if ib is None or bool((ib == 1).all()):
            ent0[:, :, :, a:b] = ent[:, :, :, a:b]
        else:                                    # (s − m)/β: the counterfactual's shifted logits, max 0
            s.mul_(ib[:, None])
            e0 = torch.exp(s)
            l0 = e0.sum(-1)
            ent0[:, :, :, a:b] = torch.log(l0) - torch.linalg.vecdot(e0, s) / l0
    return (out.reshape(B, H, T, Dh).to(q_BHTD.dtype), ent.reshape(B, H, T), ent0.reshape(B, H, T),
            sink.reshape(B, H, T))


def cpu_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e3


def padded_input(x_BHTD: torch.Tensor, y_BHTD: torch.Tensor, n: int) -> torch.Tensor:
    """[x, y] on the head axis, n whole chunks folded into the batch axis: (n, H, T/n, 2·Dh)."""
    B, H, T, Dh = x_BHTD.shape
    fold = lambda z: z.reshape(B, H, n, T // n, Dh).transpose(1, 2).reshape(B * n, H, T // n, Dh)  # noqa: E731
    return torch.cat([fold(x_BHTD), fold(y_BHTD)], -1).contiguous()


PATHS = ("attend", "padded", "fused", "single pass", "tiled", "flash 2·Dh")


def layer_rows(sizes, repeats: int) -> tuple[list[list], dict]:
    H, Hkv, Dh, floor_scale = 4, 2, 64, 512
    g = torch.Generator().manual_seed(0)
    rows, per = [], {}
    for kind, T, chunk in sizes:
        q = torch.randn(1, T, H, Dh, generator=g).transpose(1, 2)         # as the projections lay them out
        k = torch.randn(1, T, Hkv, Dh, generator=g).transpose(1, 2)
        v = torch.randn(1, T, Hkv, Dh, generator=g).transpose(1, 2)
        beta = (None if chunk else
                torch.log1p(torch.floor((torch.arange(T).float() + 1) / floor_scale)) * 0.1 + 1.0)
        a = (q, k, v, 0, 0, chunk, Dh ** -0.5)
        n = T // chunk if chunk and chunk < T else 1                       # the padded call's own inputs
        qp, kp, vp = (padded_input(x, y, n) for x, y in ((q, torch.zeros_like(q)), (k, torch.zeros_like(k)), (v, k)))
        with torch.no_grad():
            _, ref = attend_with_stats(*a, beta, method="tiled")
            _, h, h0, _ = single_pass(q, k, v, chunk, a[-1], beta)
            _, pst = attend_with_stats(*a, beta, method="padded")
            err = {"single": max((h.clamp_min(0) - ref.entropy_BHT).abs().max().item(),
                                 (h0.clamp_min(0) - ref.entropy_no_temp_BHT).abs().max().item()),
                   "padded": max((pst.entropy_BHT - ref.entropy_BHT).abs().max().item(),
                                 (pst.entropy_no_temp_BHT - ref.entropy_no_temp_BHT).abs().max().item())}
            t = time_alternating({
                "attend": lambda a=a: attend(*a),
                "padded": lambda a=a, b=beta: attend_with_stats(*a, b, method="padded"),
                "fused": lambda a=a, b=beta: attend_with_stats(*a, b, method="fused"),
                "single pass": lambda a=a, b=beta: single_pass(*a[:3], a[5], a[6], b),
                "tiled": lambda a=a, b=beta: attend_with_stats(*a, b, method="tiled"),
                "flash 2·Dh": lambda s=a[-1], x=(qp, kp, vp): _FLASH_CPU(*x, 0.0, True, scale=s),
            }, repeats=repeats)
        t = {name: t.cpu_median(name) * 1e3 for name in PATHS}
        best = min(("padded", "fused", "single pass", "tiled"), key=t.get)
        per[(kind, T, chunk)] = t
        rows.append([kind, T, chunk or "—", *(f"{t[n]:.1f}" for n in PATHS),
                     *(f"{t[n] / t['attend']:.2f}×" for n in ("padded", "fused", "single pass")),
                     f"{2 * t['attend'] - t['flash 2·Dh']:.1f}", f"**{best}**",
                     f"{err['padded']:.1e}", f"{err['single']:.1e}"])
    return rows, per


def forward_row(T: int, repeats: int, per: dict) -> list[list]:
    """The peers' model: bare forward CPU time, with statistics by each path (measured), and what each path
    would add for its 3 chunked + 1 global layer (from the layer table)."""
    from throughput import PEERS

    import workbench
    import workbench.model.attention as attention_module
    from workbench.config import Llama4TextConfig

    model = workbench.build_model(Llama4TextConfig(**PEERS)).eval()
    ids = torch.randint(0, PEERS["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))

    def with_stats(method):
        def run():
            attention_module.attend_with_stats = functools.partial(attend_with_stats, method=method)
            try:
                model(ids, last_only=True, attn_stats=True)
            finally:
                attention_module.attend_with_stats = attend_with_stats
        return run
    with torch.no_grad():
        t = time_alternating({"bare": lambda: model(ids, last_only=True),
                              "padded": with_stats("padded"), "fused": with_stats("fused")}, repeats=repeats)
    bare = t.cpu_median("bare") * 1e3
    rows = [["bare forward (measured)", f"{bare:.0f}", "1.00×"]]
    for name in ("padded", "fused"):
        ms = t.cpu_median(name) * 1e3
        rows.append([f"forward with statistics by '{name}' (measured)", f"{ms:.0f}", f"**{ms / bare:.2f}×**"])
    ch, gl = per[("chunked", T, PEERS["attention_chunk_size"])], per[("global", T, None)]
    for name in ("padded", "fused", "single pass"):
        extra = 3 * (ch[name] - ch["attend"]) + (gl[name] - gl["attend"])
        rows.append([f"bare + 3 chunked + 1 global layer by '{name}' (from the layer table)", f"{bare + extra:.0f}",
                     f"{(bare + extra) / bare:.2f}×"])
    # a flash loop that also sums e·s (H) costs ~attend; the counterfactual's second exp adds the head-size-
    # independent part b = 2·attend − flash 2·Dh on the global layer (temperature on past floor_scale)
    extra = 2 * gl["attend"] - gl["flash 2·Dh"]
    rows.append(["bare + a fused kernel (Σ a·s inside the flash loop; estimate from the layer table)",
                 f"{bare + extra:.0f}", f"{(bare + extra) / bare:.2f}×"])
    attn = 3 * ch["attend"] + gl["attend"]
    rows.append(["attention alone in the bare forward (flash)", f"{attn:.0f}", f"{attn / bare:.0%} of it"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke), does not write docs")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pin_threads(1)
    info = machine_info()
    if args.quick:
        sizes, T, r = [("chunked", 256, 64), ("chunked", 256, 512), ("global", 256, None)], 256, 1
    else:
        sizes = [("chunked", 4096, 32), ("chunked", 4096, 64), ("chunked", 4096, 128), ("chunked", 4096, 256),
                 ("chunked", 1024, 512), ("chunked", 4096, 512),
                 ("global", 512, None), ("global", 1024, None), ("global", 2048, None), ("global", 4096, None)]
        T, r = 4096, args.repeats
    rows, per = layer_rows(sizes, r)
    fwd = forward_row(T, r, per)
    body = "\n\n".join([
        "## Attention statistics on the CPU: padded flash, flash + passes, one pass over the logits (issue 20)",
        "```\npython benchmarks/attention_paths.py\n```",
        "One attention layer, 4 query / 2 kv heads × 64, prefill from position 0; median CPU ms on one thread "
        "(`time.thread_time`), contestants alternating. Global layers have NoPE temperature past floor_scale 512, "
        "so `padded` runs two flash calls there (three for `fused`) and `single pass` one extra exp. "
        "`flash 2·Dh` is the padded call alone; b = 2·attend − flash 2·Dh is the kernel time that does not grow "
        "with the head size (softmax, exp, bookkeeping). Max |ΔH|: both entropies against the tiled reference "
        "(nats).",
        markdown_table(["layer", "tokens", "chunk", *PATHS, "padded / attend", "fused / attend",
                        "single pass / attend", "b (ms)", "cheapest with statistics", "padded max |ΔH|",
                        "single-pass max |ΔH|"], rows),
        f"### The peers' model at {T} tokens (3 chunked layers + 1 global), CPU ms on one thread",
        markdown_table(["what", "CPU ms", "vs bare"], fwd),
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items())
        + f"; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ])
    print(body)
    if not args.quick:
        write_section("attention-paths", body, "Benchmarks")


if __name__ == "__main__":
    main()
