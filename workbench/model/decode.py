"""The one-token decode step, lean: what `model(ids[:, None], cache=cache, last_only=True,
attn_stats=stats).logits[:, -1]` computes, op for op, without the per-step overhead that dominates
decoding at small widths. `generate` and `generate_recorded` use it for every token after the prefill;
tests/test_decode_step.py holds it to the module forward (logits, cache, statistics, greedy tokens).

    step = DecodeStep.for_model(model)          # None: the model needs its module forward (see below)
    logits_BV = step(ids_B, cache, pos)         # one new token per row at absolute position `pos`

Why: a decode step of `tiny-moe` (hidden 128, 6 layers) through the modules was ~2,200 dispatcher ops and
~250 module calls, each 1–10 µs of Python and dispatch, against a few µs of arithmetic. Measured on one
CPU thread: an `nn.Linear` call costs ~10 µs, `torch.mm` on a transposed view of the same weight ~4 µs; a
hook-less tap call ~1 µs; the grouped expert kernel ~90 µs for one token. What this step leaves out, and
why that is exact:

* module calls: linears are `torch.mm` / `torch.addmm` on `weight.t()` views of the weights themselves
  (`F.linear` runs the same kernel); for models whose q/k/v and gate/up weights total at most FUSE_BYTES,
  those run as one product on a concatenated copy (each output column is the same dot product; the copy
  is made when the step is built, once per generation). Norms, RoPE, attention and experts call the
  functions the modules call (`rms_norm`, `rms_normalize`, the RoPE product, `attend_one_plain`,
  `attention_one.attend_one_rows`, `moe.one_token`); linears and experts of other types (int4, fp8, the
  float32 router) are called as modules.
* taps without hooks: a tap is an identity, so one with no hook is not called. A tap WITH a forward
  (pre-)hook is called where the module forward calls it, with a value of the same shape, and a tensor
  its hook returns replaces the value — the hook contract of `workbench.instrument.hooks`, so recording
  and write-interventions work unchanged. Taps are checked at every step. Attention statistics are
  computed only for the stats taps that have hooks (or sinks).
* sinks (`generate_recorded`'s collector): read-only consumers of tap values, handed the value the tap's
  hooks pass on, without the hook machinery.
* input validation: generated ids come from the model's own logits, within the vocabulary.
* interventions (`intervene`) are module attributes read at every step; routing edits go through
  `Llama4TextMoe.route`, as in the module forward.

`for_model` returns None — callers then run the module forward — for anything else: a model type other
than `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` (text steps), a replaced decoder-layer,
attention, norm or feed-forward class, a hook on any module that is not a tap, or a module whose
`forward` was replaced on the instance (e.g. by a tracing library). A step taken while a global module
hook is registered, or with autograd enabled, runs the module forward too.

Legend: B batch (one new token per row), D hidden, H heads, Hkv kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from workbench.instrument.tap import Tap
from workbench.model.attention import Llama4TextAttention, rms_normalize
from workbench.model.attention_one import attend_one_plain, attend_one_rows
from workbench.model.attention_stats import TILE_ELEMS, attend_with_stats
from workbench.model.kv_cache import KVCache
from workbench.model.moe import Llama4TextExperts, Llama4TextMLP, Llama4TextMoe, one_token
from workbench.model.transformer import Llama4ForCausalLM, Llama4TextDecoderLayer, Llama4TextRMSNorm, rms_norm

# q/k/v and gate/up weights are concatenated into fused copies (one matmul instead of two or three) when
# all of them together take at most this much: decode of a small model is bound by per-op overhead, a
# large one by reading its weights, where a copy would only add memory
FUSE_BYTES = 64 << 20


def _call(tap: Tap, x: torch.Tensor) -> torch.Tensor:
    """`tap(x)` for a tap with hooks. With plain forward hooks only (no pre-hooks, no kwargs hooks),
    calls them as `nn.Module._call_impl` does — `hook(tap, (x,), x)` in order, a result that is not None
    replacing the value — without its machinery (~3 µs a call at decode sizes); otherwise `tap(x)`."""
    if tap._forward_pre_hooks or tap._forward_hooks_with_kwargs:
        return tap(x)
    for hook in tuple(tap._forward_hooks.values()):
        out = hook(tap, (x,), x)
        if out is not None:
            x = out
    return x


def _rope(x_BH1D: torch.Tensor, rot_111P: torch.Tensor) -> torch.Tensor:
    """`rope.apply_rope` with the rotation already shaped for broadcasting (the same complex product)."""
    xf = x_BH1D if x_BH1D.dtype == torch.float32 else x_BH1D.float()
    out = torch.view_as_real(torch.view_as_complex(xf.reshape(*x_BH1D.shape[:-1], -1, 2)) * rot_111P).flatten(3)
    return out if out.dtype == x_BH1D.dtype else out.type_as(x_BH1D)


class _Linear:
    """`module(x)` for a 2-D x, as `torch.mm` on the weight's transposed view when `module` is a plain
    `nn.Linear` (the kernel `F.linear` runs), else by calling the module on x viewed as (B, 1, I)."""
    __slots__ = ("wt", "b", "module")

    def __init__(self, m: nn.Module):
        plain = type(m) is nn.Linear
        self.module = None if plain else m
        self.wt = m.weight.detach().t() if plain else None
        self.b = m.bias.detach() if plain and m.bias is not None else None

    def __call__(self, x_BI: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x_BI[:, None]).reshape(x_BI.shape[0], -1)
        return torch.mm(x_BI, self.wt) if self.b is None else torch.addmm(self.b, x_BI, self.wt)

    @classmethod
    def fused(cls, ms: list[nn.Module], fuse: bool) -> _Linear | None:
        """One linear over plain `nn.Linear`s of one input, their weights concatenated (a copy) so one
        matmul gives all outputs side by side: each output column is the same dot product of the same
        row. None when `fuse` is off or a module is not a plain linear or only some have a bias."""
        if not fuse or any(type(m) is not nn.Linear for m in ms) or len({m.bias is None for m in ms}) > 1:
            return None
        out = cls.__new__(cls)
        out.module = None
        out.wt = torch.cat([m.weight.detach() for m in ms]).t()
        out.b = None if ms[0].bias is None else torch.cat([m.bias.detach() for m in ms])
        return out


def _fused_bytes(model: nn.Module) -> int:
    """Bytes the fused copies would take: q/k/v and gate/up weights of every layer."""
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if n.rsplit(".", 1)[-1] in names and isinstance(getattr(m, "weight", None), torch.Tensor))


class _MLP:
    """SwiGLU as `Llama4TextMLP.forward`; `flat`: the module sees (N, D) (shared expert) not (B, 1, D)."""
    __slots__ = ("gate", "up", "down", "gate_up", "module")

    def __init__(self, m: nn.Module, fuse: bool):
        self.module = None if type(m) is Llama4TextMLP else m
        if self.module is None:
            self.gate, self.up, self.down = _Linear(m.gate_proj), _Linear(m.up_proj), _Linear(m.down_proj)
            self.gate_up = _Linear.fused([m.gate_proj, m.up_proj], fuse)

    def __call__(self, x_BD: torch.Tensor, flat: bool) -> torch.Tensor:
        if self.module is not None:
            return self.module(x_BD) if flat else self.module(x_BD[:, None]).reshape(x_BD.shape)
        if self.gate_up is not None:
            gate, up = self.gate_up(x_BD).chunk(2, dim=-1)
            return self.down(torch.nn.functional.silu(gate) * up)
        return self.down(torch.nn.functional.silu(self.gate(x_BD)) * self.up(x_BD))


class _Layer:
    __slots__ = ("att", "ff", "moe", "in_w", "in_eps", "post_w", "post_eps", "q", "k", "v", "o", "qkv",
                 "router", "shared", "mlp", "gate_up", "down", "taps", "moe_taps")

    def __init__(self, layer: Llama4TextDecoderLayer, fuse: bool):
        self.att, self.ff = layer.self_attn, layer.feed_forward
        self.in_w, self.in_eps = layer.input_layernorm.weight.detach(), layer.input_layernorm.eps
        self.post_w, self.post_eps = layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.eps
        a = self.att
        self.q, self.k, self.v, self.o = _Linear(a.q_proj), _Linear(a.k_proj), _Linear(a.v_proj), _Linear(a.o_proj)
        self.qkv = _Linear.fused([a.q_proj, a.k_proj, a.v_proj], fuse)
        self.moe = isinstance(self.ff, Llama4TextMoe)
        self.gate_up = self.down = None
        if self.moe:
            self.router, self.shared = _Linear(self.ff.router), _MLP(self.ff.shared_expert, fuse)
            f = self.ff                     # submodules: read once, not through Module.__getattr__ per step
            self.moe_taps = (f.hook_router_logits, f.hook_topk_ids, f.hook_topk_gates, f.hook_shared_out,
                             f.hook_routed_out)
            ex = self.ff.experts
            if type(ex) is Llama4TextExperts and ex.gate_up_proj.shape[0] == ex.total:
                # per-expert views, made once: indexing a list costs no dispatcher op per step
                self.gate_up = list(ex.gate_up_proj.detach().unbind(0))
                self.down = list(ex.down_proj.detach().unbind(0))
        else:
            self.mlp = _MLP(self.ff, fuse)
        self.taps = (layer.hook_resid_pre, layer.hook_attn_out, layer.hook_resid_mid, layer.hook_mlp_out,
                     layer.hook_resid_post, a.hook_q, a.hook_k, a.hook_v, a.hook_z, a.hook_entropy,
                     a.hook_entropy_no_temp, a.hook_n_keys, a.hook_sink_mass)


def _eligible(model: nn.Module, text: Llama4ForCausalLM) -> bool:
    for m in model.modules():
        if "forward" in m.__dict__:
            return False                        # forward replaced on the instance
        if not isinstance(m, Tap) and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                       or m._backward_pre_hooks):
            return False
    for layer in text.model.layers:
        if (type(layer) is not Llama4TextDecoderLayer or type(layer.self_attn) is not Llama4TextAttention
                or type(layer.input_layernorm) is not Llama4TextRMSNorm
                or type(layer.post_attention_layernorm) is not Llama4TextRMSNorm
                or type(layer.feed_forward) not in (Llama4TextMoe, Llama4TextMLP)):
            return False
    return type(text.model.norm) is Llama4TextRMSNorm and type(text.model.embed_tokens) is nn.Embedding


class DecodeStep:
    """One-token decode steps of `model` (see the module docstring). Built per generation: it holds views
    of the weights as they are when built (in-place updates show, re-assigned parameters do not)."""

    def __init__(self, model: nn.Module, text: Llama4ForCausalLM):
        self.model = model
        tm = text.model
        self.embed_w = tm.embed_tokens.weight.detach()
        self.norm_w, self.norm_eps = tm.norm.weight.detach(), tm.norm.eps
        self.head = _Linear(text.lm_head)
        fuse = _fused_bytes(tm) <= FUSE_BYTES
        self.layers = [_Layer(layer, fuse) for layer in tm.layers]
        self.inv_freq = tm.inv_freq.float()
        self.rope = any(lp.att.use_rope for lp in self.layers)             # any layer needs the rotation
        self.hook_embed, self.hook_final_norm = tm.hook_embed, tm.hook_final_norm
        self.taps = [t for t in model.modules() if isinstance(t, Tap)]       # the text model's among them
        self._act: set = set()

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        from workbench.model.multimodal import Llama4ForConditionalGeneration

        if type(model) is Llama4ForCausalLM:
            text = model
        elif type(model) is Llama4ForConditionalGeneration and type(model.language_model) is Llama4ForCausalLM:
            text = model.language_model
        else:
            return None
        return cls(model, text) if _eligible(model, text) else None

    def _fire(self, tap: Tap, x: torch.Tensor, shape=None) -> torch.Tensor:
        """The tap's value after its hooks (shown to them in `shape`, the module forward's, returned in
        x's), then handed to its sink; call only for taps in the step's wanted set (`self._act`)."""
        v = x if shape is None else x.view(shape)
        if tap._forward_hooks or tap._forward_pre_hooks:
            v = _call(tap, v)
        sink = self._sinks.get(tap)
        if sink is not None:
            sink[0](v, sink[1])
        return v if shape is None else v.reshape(x.shape)

    def __call__(self, ids_B: torch.Tensor, cache: KVCache, pos: int, stats: bool = False,
                 sinks: dict[Tap, tuple] | None = None) -> torch.Tensor:
        """Logits (B, V) for one new token per row at absolute position `pos`, updating `cache`.

        `sinks` {tap: (fn, site)}: read-only consumers of tap values (a recorder), called as
        `fn(value, site)` with the value the tap's hooks pass on — what a forward hook registered after
        the others would see — without going through the hook machinery (`generate_recorded` uses it
        for its collector during the decode steps; users' hooks on the same taps still fire first)."""
        self._sinks = sinks or {}
        self._n_keys: dict = {}             # one n_keys tensor per key count in this step
        if (torch.is_grad_enabled() or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks):
            handles = [tap.register_forward_hook(lambda _m, _i, out, fn=fn, site=site: fn(out, site))
                       for tap, (fn, site) in self._sinks.items()]        # the sinks as last hooks
            try:
                out = self.model(ids_B[:, None], start=pos, cache=cache, attn_stats=stats, last_only=True)
            finally:
                for h in handles:
                    h.remove()
            return out.logits[:, -1]
        # inference mode (no version counters, no view tracking: ~20 % of a tiny-moe step) unless a user's
        # hook will see a value — a hook may keep one for autograd, which inference tensors refuse. The
        # cache's buffers were made before (`KVCache.for_generation` reserves every slot), and writing a
        # normal tensor in place is allowed in inference mode; what leaves the step (logits, sink values)
        # is only read afterwards, which inference tensors allow.
        act = {t for t in self.taps if t._forward_hooks or t._forward_pre_hooks}
        hooked = bool(act)
        act.update(self._sinks)
        self._act = act                     # the taps whose values are wanted in this step
        with torch.inference_mode(not hooked):
            return self._forward(ids_B, cache, pos, stats)

    def _forward(self, ids_B: torch.Tensor, cache: KVCache, pos: int, stats: bool) -> torch.Tensor:
        act = self._act
        B = ids_B.shape[0]
        x = torch.nn.functional.embedding(ids_B, self.embed_w)                      # (B, D)
        if self.hook_embed in act:
            x = self._fire(self.hook_embed, x, (B, 1, -1))
        rot = None
        if self.rope:
            # `rotations` at one position: float32(pos)·θ (pos < 2²⁴ is exact in float32, as the position
            # tensor's .float() is), then polar — the same elementwise ops, bitwise, in 3 ops instead of 7;
            # shaped (1, 1, 1, P) for (B, H, 1, P) pairs
            angles = self.inv_freq * float(pos)
            rot = torch.polar(torch.ones_like(angles), angles).view(1, 1, 1, -1)
        for lp, lc in zip(self.layers, cache.layers):
            x = self._layer(lp, lc, x, pos, rot, stats)
        x = rms_norm(x, self.norm_w, self.norm_eps)
        if self.hook_final_norm in act:
            x = self._fire(self.hook_final_norm, x, (B, 1, -1))
        return self.head(x)

    def _layer(self, lp: _Layer, lc, x: torch.Tensor, pos: int, rot, stats: bool) -> torch.Tensor:
        act = self._act
        (t_pre, t_attn, t_mid, t_mlp, t_post, t_q, t_k, t_v, t_z, t_ent, t_ent0, t_nk, t_sink) = lp.taps
        B, D = x.shape
        row = (B, 1, D)
        if t_pre in act:
            x = self._fire(t_pre, x, row)
        a = lp.att
        h = rms_norm(x, lp.in_w, lp.in_eps)
        H, Hkv, Dh = a.n_heads, a.n_kv, a.head_dim
        if lp.qkv is not None:      # one matmul; RoPE and QK norm act per head, so q and k go together
            y = lp.qkv(h)
            qk, v = y.split_with_sizes(((H + Hkv) * Dh, Hkv * Dh), 1)   # one op, no Tensor.split wrapper
            # heads on axis 1, the attention layout (B, H, 1, Dh): for one token the same memory as the
            # projections' (B, 1, H, Dh), so no transposes; RoPE and the norms act per head either way
            qk, v = qk.view(B, H + Hkv, 1, Dh), v.view(B, Hkv, 1, Dh)
            if a.use_rope:
                qk = _rope(qk, rot)
            if a.use_qk_norm:
                qk = rms_normalize(qk, a.eps)
            q, k = qk.split_with_sizes((H, Hkv), 1)
        else:
            q = lp.q(h).view(B, H, 1, Dh)                                                  # (B, H, 1, Dh)
            k = lp.k(h).view(B, Hkv, 1, Dh)
            v = lp.v(h).view(B, Hkv, 1, Dh)
            if a.use_rope:
                q, k = _rope(q, rot), _rope(k, rot)
            if a.use_qk_norm:
                q, k = rms_normalize(q, a.eps), rms_normalize(k, a.eps)
        beta = None
        if a.temperature_tuning and pos + 1 >= a.floor_scale:     # as the module: β ≡ 1 before floor_scale
            beta = a.temperature(torch.arange(pos, pos + 1, device=x.device))
            q = (q * beta.view(1, 1, 1, 1)).to(q.dtype)
        if t_q in act:       # hooks see contiguous (B, 1, heads, Dh) tensors, as the module forward gives them
            q = self._fire(t_q, q.contiguous(), (B, 1, H, Dh))
        if t_k in act:
            k = self._fire(t_k, k.contiguous(), (B, 1, Hkv, Dh))
        if t_v in act:
            v = self._fire(t_v, v.contiguous(), (B, 1, Hkv, Dh))
        if stats:
            # `attend_one` on rows: the G heads of a kv head as rows of q, the cache's (B·Hkv, cap, Dh) views
            lc.append(k, v, pos)
            ka = lc.start if a.chunk is None else max((pos // a.chunk) * a.chunk, lc.start)
            n = pos + 1 - ka
            hooked = (t_ent in act, t_ent0 in act, t_nk in act, t_sink in act)
            want = (hooked[0] or hooked[1], hooked[2], hooked[3])       # statistics nobody reads: not computed
            if H * n <= TILE_ELEMS:
                z, st = attend_one_rows(q.reshape(B * Hkv, H // Hkv, Dh), lc.k_rows.narrow(1, ka - lc.start, n),
                                        lc.v_rows.narrow(1, ka - lc.start, n), B, ka == 0, a.scaling, beta, want,
                                        self._n_keys)
            else:
                z, st = attend_with_stats(q, lc.k, lc.v, pos, lc.start, a.chunk, a.scaling, beta)
            for tap, val, on in zip((t_ent, t_ent0, t_nk, t_sink), (st.entropy_BHT, st.entropy_no_temp_BHT,
                                                                     st.n_keys_T, st.sink_mass_BHT), hooked):
                if on:
                    self._fire(tap, val)
        else:
            k_all, v_all, k0 = lc.update(k, v, pos)
            z = attend_one_plain(q, k_all, v_all, pos, k0, a.chunk, a.scaling)                   # (B, H, 1, Dh)
        lc.trim(pos + 1, a.chunk)
        if t_z in act:
            z = self._fire(t_z, z.reshape(B, 1, H, Dh))
        o = lp.o(z.reshape(B, -1))          # every layout of z above holds the token's heads in order
        if t_attn in act:
            o = self._fire(t_attn, o, row)
        x = x + o
        if t_mid in act:
            x = self._fire(t_mid, x, row)
        h = rms_norm(x, lp.post_w, lp.post_eps)
        f = self._moe(lp, h) if lp.moe else lp.mlp(h, flat=False)
        if t_mlp in act:
            f = self._fire(t_mlp, f, row)
        x = x + f
        if t_post in act:
            x = self._fire(t_post, x, row)
        return x

    def _moe(self, lp: _Layer, x_ND: torch.Tensor) -> torch.Tensor:
        """`Llama4TextMoe.forward` on (N, D) rows (N = B: one token per row)."""
        act = self._act
        ff = lp.ff
        t_logits, t_ids, t_gates, t_shared, t_routed = lp.moe_taps
        logits = lp.router(x_ND)
        if t_logits in act:
            logits = self._fire(t_logits, logits)
        iv = ff.intervention
        if iv.mask or iv.force or iv.top_k is not None:
            ids, gate = ff.route(logits)
        else:                           # route() without edits: top-k values are the logits it gathers
            top = torch.topk(logits, ff.top_k, dim=-1)
            ids, vals = top.indices, top.values
            gate = torch.sigmoid(vals if vals.dtype == torch.float32 else vals.float())
            if gate.dtype != logits.dtype:
                gate = gate.to(logits.dtype)
        if t_ids in act:
            ids = self._fire(t_ids, ids)
        if t_gates in act:
            gate = self._fire(t_gates, gate)
        shared = torch.zeros_like(x_ND) if iv.drop_shared else lp.shared(x_ND, flat=True)
        if t_shared in act:
            shared = self._fire(t_shared, shared)
        if iv.drop_routed:
            routed = torch.zeros_like(x_ND)
        elif lp.gate_up is not None and x_ND.shape[0] == 1:
            routed = one_token(x_ND, ids, gate, lp.gate_up, lp.down)
        else:
            routed = ff.experts(x_ND, ids, gate)
        if t_routed in act:
            routed = self._fire(t_routed, routed)
        return shared + routed
