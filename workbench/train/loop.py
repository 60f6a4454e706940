"""A plain training loop for small Llama 4 models on CPU: AdamW, linear warmup + cosine decay,
gradient clipping, a router load-balancing loss, optional router z-loss, checkpoint/resume,
tqdm progress and a loss-curve plot.

    loss = CE(next token) + aux_coef · Σ_layers L_balance + z_coef · Σ_layers L_z

Load balance (science.md §1.3). Llama 4's HF port trains with no auxiliary loss and its router
emits no distribution (top-k of raw logits, sigmoid gate), so a convention must be chosen; ours is
Switch Transformer's (Fedus et al. 2021, Eq. 4–6) with softmax probabilities:

    L_balance = E · Σ_i f_i · P_i,   f_i = share of the N·k (token, slot) assignments routed to i
                                     P_i = (1/N) Σ_x softmax(router_logits(x))_i

f sums to 1, so L_balance = 1 under uniform routing for any k (HF's `load_balancing_loss_func`
gives k there) and E when every token goes to one expert. f is a count (no gradient); the gradient
reaches the router through P. Router z-loss (ST-MoE): L_z = (1/N) Σ_x logsumexp(router_logits(x))².
Both are computed per MoE layer on the logits published at `feed_forward.hook_router_logits`,
collected with `workbench.instrument.hooks.hooks` — the model itself is unchanged.

Resume is exact: the batch at step s is drawn from a generator seeded with (seed, s), and the
checkpoint holds the model, the optimizer and the history, written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.instrument.hooks import hooks

ROUTER_SITE = "model.layers.*.feed_forward.hook_router_logits"


# ------------------------------------------------------------------------------ auxiliary losses
def load_balancing_loss(logits_NE: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Switch-style E·Σ_i f_i P_i (see the module docstring): 1 when uniform, E when collapsed."""
    E = logits_NE.shape[-1]
    P_E = torch.softmax(logits_NE.float(), dim=-1).mean(0)                      # (E,)
    ids_NK = torch.topk(logits_NE, top_k, dim=-1).indices
    f_E = torch.bincount(ids_NK.reshape(-1), minlength=E).float() / ids_NK.numel()
    return E * (f_E * P_E).sum()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


# ------------------------------------------------------------------------------ settings
@dataclass
class TrainSettings:
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.1            # cosine decays to lr · min_lr_frac
    warmup: int = 100
    weight_decay: float = 0.1           # on matrices only (dim ≥ 2), not on norms
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_coef: float = 0.01              # Switch / OLMoE value
    z_coef: float = 0.0                 # ST-MoE uses 1e-3; off by default
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 8               # held-out windows per domain at each periodic evaluation
    ckpt_every: int = 100
    threads: int | None = 2         # torch CPU threads while training; None = leave as is
    weights: dict[str, float] = field(default_factory=dict)   # domain → sampling weight


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to s.lr over s.warmup steps, then cosine to s.lr·s.min_lr_frac at s.steps."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}]
    # fused: one kernel per step instead of ~10 per parameter (CPU support since torch 2.4)
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=True)


def batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ------------------------------------------------------------------------------ one step
def compute_loss(model, x_BT: torch.Tensor, y_BT: torch.Tensor, s: TrainSettings) -> dict[str, torch.Tensor]:
    """Cross-entropy plus the router losses summed over MoE layers (weighted in 'loss')."""
    logits: list[torch.Tensor] = []
    with hooks(model, {ROUTER_SITE: lambda v, _site: logits.append(v)}):
        out = model(x_BT).logits                                                  # (B, T, V)
    ce = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y_BT.reshape(-1))
    k = model.config.num_experts_per_tok
    zero = ce.new_zeros(())
    bal = sum((load_balancing_loss(r, k) for r in logits), zero)
    z = sum((router_z_loss(r) for r in logits), zero)
    return {"loss": ce + s.aux_coef * bal + s.z_coef * z, "ce": ce,
            "balance": bal / max(len(logits), 1), "z": z / max(len(logits), 1)}


def train_step(model, opt, batch: tuple, step: int, s: TrainSettings, loss_fn=None) -> dict[str, float]:
    """One optimizer step on `batch`; `loss_fn(model, batch, s)` → {"loss", …} (default: next-token
    `compute_loss` on batch = (x, y, …))."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, s)
    losses = loss_fn(model, batch, s) if loss_fn is not None else compute_loss(model, batch[0], batch[1], s)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    opt.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    return out | {"grad_norm": float(norm), "lr": opt.param_groups[0]["lr"]}


@torch.no_grad()
def heldout_losses(model, windows: dict[str, torch.Tensor], batch: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain over fixed held-out windows (n, T+1)."""
    was = model.training
    model.eval()
    out = {}
    for d, w in windows.items():
        tot, n = 0.0, 0
        for i in range(0, len(w), batch):
            xy = w[i:i + batch]
            logits = model(xy[:, :-1]).logits.float()
            tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1),
                                         reduction="sum"))
            n += xy[:, 1:].numel()
        out[d] = tot / n
    model.train(was)
    return out


# ------------------------------------------------------------------------------ checkpoints
def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a killed run never leaves a
    half-written checkpoint under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(path: Path, model, opt, step: int, history: list[dict], s: TrainSettings) -> None:
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                       "history": history, "settings": asdict(s)}, path)


def load_state(path: Path, model, opt) -> tuple[int, list[dict]]:
    st = torch.load(path, map_location="cpu", weights_only=True)   # plain containers only: no pickle code
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    return st["step"], st["history"]


# ------------------------------------------------------------------------------ the loop
def train(model, train_streams, eval_windows_by_domain: dict[str, torch.Tensor], s: TrainSettings,
          work_dir: str | Path | None = None, progress: bool = True, stop_after: int | None = None, *,
          batch_fn=None, loss_fn=None, eval_fn=None, desc: str = "train") -> list[dict]:
    """Train `model` in place for s.steps steps; resume from `work_dir/state.pt` when it exists.

    Returns the history: one dict per step (step, loss terms, lr, grad norm, seconds) and, every
    s.eval_every steps and at the end, an {"eval": {name: value}} entry. `stop_after` ends the run
    after that many steps of this call (for tests of resume) without touching the schedule.

    Text models draw windows from `train_streams` and evaluate held-out loss on
    `eval_windows_by_domain`. Other data (the tiny-vlm's scenes) pass `batch_fn(step)` → a tuple
    whose first item is a tensor of input tokens, `loss_fn(model, batch, s)` and `eval_fn(model)` →
    {name: float}; batch_fn must be a function of the step alone for resume to be exact."""
    from tqdm.auto import tqdm

    from workbench.train.data import sample_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads or threads)
    # Adam's second moments of tiny gradients are denormal floats, which x86 handles ~100x slower
    # (measured on this model: a training step took ~40 % more CPU time without this)
    torch.set_flush_denormal(True)
    try:
        state_path = Path(work_dir) / "state.pt" if work_dir is not None else None
        opt = make_optimizer(model, s)
        step, history = 0, []
        if state_path is not None and state_path.exists():
            step, history = load_state(state_path, model, opt)
        model.train()
        weights = s.weights or {d: 1.0 for d in (train_streams or {})}
        bar = tqdm(total=s.steps, initial=step, disable=not progress, desc=desc, unit="step")
        done = 0
        while step < s.steps and (stop_after is None or done < stop_after):
            t0 = time.perf_counter()
            batch = (batch_fn(step) if batch_fn is not None else
                     sample_batch(train_streams, weights, s.batch_size, s.seq_len, batch_generator(s.seed, step)))
            x = batch[0]
            rec = train_step(model, opt, batch, step, s, loss_fn)
            step, done = step + 1, done + 1
            rec |= {"step": step, "seconds": time.perf_counter() - t0}
            history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['ce']:.3f}", bal=f"{rec['balance']:.3f}",
                            tok_s=f"{x.numel() / rec['seconds']:.0f}")
            last = step == s.steps
            if (eval_fn is not None or eval_windows_by_domain) and (step % s.eval_every == 0 or last):
                ev = (eval_fn(model) if eval_fn is not None else
                      heldout_losses(model, {d: w[:s.eval_windows] for d, w in eval_windows_by_domain.items()}))
                model.train()
                history.append({"step": step, "eval": ev})
                bar.write(f"step {step}: held-out " + " ".join(f"{d} {v:.3f}" for d, v in ev.items()))
            if state_path is not None and (step % s.ckpt_every == 0 or last):
                save_state(state_path, model, opt, step, history, s)
        if state_path is not None and (stop_after is not None and step < s.steps):
            save_state(state_path, model, opt, step, history, s)
        bar.close()
        model.eval()
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)     # the process default
    return history


# ------------------------------------------------------------------------------ loss curve
def _round(v):
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return float(f"{v:.5g}") if isinstance(v, float) else v


def write_loss_curve(history: list[dict], out_dir: str | Path, title: str = "training") -> tuple[Path, Path]:
    """loss_curve.json (the history) and loss_curve.html (plotly, loaded from its CDN: a few KB)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history if "ce" in h]
    ce = [h["ce"] for h in history if "ce" in h]
    smooth, acc = [], None
    for v in ce:                                   # exponential moving average, as most loggers show
        acc = v if acc is None else 0.95 * acc + 0.05 * v
        smooth.append(acc)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cross-entropy (nats/token)", "load balance E·Σ f·P"))
    fig.add_trace(go.Scatter(x=steps, y=ce, name="train", opacity=0.3, line={"color": "grey"}), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=smooth, name="train (EMA 0.95)", line={"color": "black"}), 1, 1)
    evals = [h for h in history if "eval" in h]
    for d in (evals[0]["eval"] if evals else {}):
        fig.add_trace(go.Scatter(x=[h["step"] for h in evals], y=[h["eval"][d] for h in evals],
                                 name=f"held-out {d}", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[h["balance"] for h in history if "ce" in h], name="balance (1 = uniform)",
                             line={"color": "firebrick"}), 1, 2)
    fig.update_layout(title=title, xaxis_title="step", xaxis2_title="step", height=450, width=1100)
    j, h = out / "loss_curve.json", out / "loss_curve.html"
    j.write_text(json.dumps([{k: _round(v) for k, v in h.items()} for h in history]))
    fig.write_html(str(h), include_plotlyjs="cdn")
    return j, h
