"""Which image tokens made the model say this? Image-token attributions with captum (science.md §4.1).

    y_j(feats_ID) = log p(target_j | prompt, target_<j)      one output per target token j
    feats_ID      = projected image features (the `hook_image_features` values), scattered into the
                    <|patch|> rows of the text stream exactly as `Llama4ForConditionalGeneration` does

Methods (captum's implementations; nothing here re-implements an algorithm):
  ig         IntegratedGradients on feats (Gauss-Legendre, `steps`=64); captum's convergence delta kept.
  gxi        InputXGradient on feats (gradient × input).
  ablation   FeatureAblation on feats with feature masks grouping the hidden dims of each token
             ("token") or of each tile ("tile"); a group is replaced by the baseline.
  occlusion  FeatureAblation over pixel segments of the ORIGINAL image with captum's `ImageMaskInput`:
             each local token's 28×28-px cell ("token") or each local tile ("tile") is painted `rgb`
             and the image re-processed, so the global tile sees the occlusion too (§4.2 step 6).
Per-token score: the attribution summed over the hidden dim (ig, gxi); ablation and occlusion give
one value per group, broadcast to its tokens. Occlusion leaves global-tile tokens NaN (no pixel
segment owns them). Positive = the token raises log p(target).

Baselines x′ (ig, ablation):
  "zero"  all-zero features — an embedding the model never saw in training (captum's default).
  "mean"  every token replaced by the mean image-token embedding of this prompt's own image tokens
          (Neo et al. 2024's mean ablation; pass an (I, D) or (D,) tensor for a dataset mean). Default.
  "blur"  features of the Gaussian-blurred image(s) (radius: half a token cell, in original pixels),
          same tiling: colour and layout stay, detail goes (Sturmfels et al. 2020, distill.pub).
  `pixel_values = 0` is mid-grey after normalisation, not black (§4.1), hence no pixel baseline.

Routing. Llama 4's top-1 router makes y piecewise smooth: an expert switch along the IG path is a
jump the gradient never sees, so completeness breaks whatever the steps (tiny-vision, 2 targets ×
3 baselines: 3–190 % relative error, unchanged at 16, 32 and 64 steps). `routing="pinned"` (the
default for ig/gxi) keeps each token's experts as chosen on the real input x, with gates and experts
still differentiable, so y is smooth and Σ IG = y(x) − y_pinned(x′) (tiny-vision: ≤ 1e-4 relative
at 32 and 64 steps). y_pinned(x) = y(x) exactly, and gxi is the same under both. Ablation and
occlusion always run the model as is. Run attributions in float32 (bf16 gradients are coarse).

Attention-based companions (`attention_views`) are cheap but NOT attributions: attention mass of
each target row on the image tokens per layer/head, and rollout (Abnar & Zuidema 2020).

Legend: I image tokens, D hidden, J target tokens, B batch (IG steps / perturbations), T tokens,
L layers, H heads, K top-k, V vocab, F pixel segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.image import PatchMap, Prepared, load_image, prepare
from workbench.instrument.hooks import hooks, run_with_cache

METHODS = ("ig", "gxi", "ablation", "occlusion")
BASELINES = ("zero", "mean", "blur")
GROUPS = ("token", "tile")
ATTENTION_LABEL = "attention-based (not attribution)"


@dataclass
class AttributionResult:
    """Scores of one method: (target token, image token), with what is needed to map them to pixels."""
    method: str                             # "ig", "gxi", "ablation", "occlusion", "attention_rollout"
    scores: np.ndarray                      # (J, I) float32
    target_ids: np.ndarray                  # (J,)
    target_strings: list[str]
    target_positions: np.ndarray            # (J,) row of the sequence whose logits predict each target
    logprob: np.ndarray                     # (J,) y(x)
    patch_map: PatchMap
    baseline: str | None = None
    steps: int | None = None
    groups: str | None = None
    routing: str = "as-run"
    baseline_logprob: np.ndarray | None = None   # (J,) y(x′), under `routing`
    delta: np.ndarray | None = None              # (J,) captum convergence delta Σ IG − (y(x) − y(x′))
    label: str = "attribution"
    extras: dict = field(default_factory=dict)   # store name -> (dims, array)

    @property
    def completeness_error(self) -> np.ndarray | None:
        """(J,) |Σ IG − (y(x) − y(x′))| / |y(x) − y(x′)| (science.md §6.8)."""
        if self.delta is None:
            return None
        return np.abs(self.delta) / np.abs(self.logprob - self.baseline_logprob)

    def attrs(self) -> dict:
        return dict(method=self.method, label=self.label, baseline=self.baseline, steps=self.steps,
                    groups=self.groups, routing=self.routing, target_strings=list(self.target_strings),
                    score="sum over hidden dim" if self.method in ("ig", "gxi") else "per group, broadcast",
                    output="log p(target token)")

    def save(self, store, name: str | None = None) -> str:
        """Write under `attribution[/name]` of a run (workbench.attribution_store); returns the group path."""
        from workbench.attribution_store import patch_map_arrays, write_attribution

        arrays = {"scores": (("target", "image_token"), self.scores.astype(np.float32)),
                  "target_token": (("target",), self.target_ids.astype(np.int32)),
                  "target_position": (("target",), self.target_positions.astype(np.int32)),
                  "logprob": (("target",), self.logprob.astype(np.float32)), **patch_map_arrays(self.patch_map)}
        for key in ("baseline_logprob", "delta"):
            if getattr(self, key) is not None:
                arrays[key] = (("target",), getattr(self, key).astype(np.float32))
        arrays.update(self.extras)
        return write_attribution(store, arrays, self.attrs(), patch_map=self.patch_map, name=name)


# ------------------------------------------------------------------------------------- the target
def target_ids(model, prepared: Prepared, target=None, max_new_tokens: int = 8) -> list[int]:
    """An answer string's tokens, given ids, or (target=None) the greedy continuation of the prompt."""
    if isinstance(target, str):
        ids = model.tokenizer.encode(target, add_bos=False)
    elif target is not None:
        ids = [int(t) for t in (target.tolist() if isinstance(target, torch.Tensor) else target)]
    else:
        from workbench.model.kv_cache import KVCache

        ids, stops = [], set(model.tokenizer.stop_ids if model.tokenizer is not None else [])
        cache = KVCache(model.config.text_config.num_hidden_layers)
        pv = None if prepared.pixel_values is None else prepared.pixel_values.to(model.dtype)
        with torch.no_grad():
            out = model(prepared.input_ids.to(model.device), pv, cache=cache, last_only=True)
            for _ in range(max_new_tokens):
                ids.append(int(out.logits[0, -1].argmax()))
                if ids[-1] in stops:
                    break
                out = model(torch.tensor([[ids[-1]]], device=model.device), cache=cache, last_only=True)
    if not ids:
        raise ValueError(f"the target {target!r} has no tokens")
    return ids


class ImageTarget:
    """y(feats_BID) → (B, J) log-probabilities of the target tokens, differentiable in the features.

    The sequence is prompt + target[:-1] (teacher forcing), so row P−1+j predicts target j; the
    lm_head runs only on those rows, so memory does not grow with the vocabulary × prompt length."""

    def __init__(self, model, prepared: Prepared, targets: Sequence[int]):
        if prepared.pixel_values is None:
            raise ValueError("the prompt has no image: nothing to attribute to")
        self.model, self.prepared = model, prepared
        dev = model.device
        self.target = torch.tensor(list(targets), dtype=torch.long, device=dev)             # (J,)
        P, J = prepared.input_ids.shape[1], len(self.target)
        self.ids = torch.cat([prepared.input_ids[0].to(dev), self.target[:-1]])[None]       # (1, T)
        model.check_inputs(self.ids)
        self.positions = torch.arange(P - 1, P - 1 + J, device=dev)
        self.mask = model.image_token_mask(self.ids)                                         # (1, T)
        with torch.no_grad():
            self.embed = model.language_model.model.embed_tokens(self.ids)                  # (1, T, D)
            self.features = self.image_features(prepared.pixel_values)                       # (I, D)
            routes: dict[str, torch.Tensor] = {}
            site = "language_model.model.layers.*.feed_forward.hook_topk_ids"
            with hooks(model, {site: lambda v, s: routes.__setitem__(s, v.clone())}):
                self.logprob = self(self.features[None])[0]                                  # (J,)
        self.routes = routes                                                                 # site -> (T, K)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values.to(self.model.device, self.model.dtype))

    def __call__(self, feats_BID: torch.Tensor) -> torch.Tensor:
        B = feats_BID.shape[0]
        lm = self.model.language_model
        x = self.embed.expand(B, -1, -1).masked_scatter(self.mask.expand(B, -1)[..., None],
                                                       feats_BID.to(self.embed.dtype))      # (B, T, D)
        h, _ = lm.model(inputs_embeds=x)
        logits = lm.lm_head(h[:, self.positions]).float()                                    # (B, J, V)
        return logits.log_softmax(-1).gather(-1, self.target.expand(B, -1)[..., None])[..., 0]

    @contextmanager
    def routing(self, mode: str):
        """'as-run': the model as is. 'pinned': every MoE layer keeps the experts chosen on x per token;
        gates stay sigmoid(router logit of that expert), so gradients flow through router and experts."""
        if mode not in ("as-run", "pinned"):
            raise ValueError(f"routing must be 'as-run' or 'pinned', got {mode!r}")
        if mode == "as-run" or not self.routes:
            yield
            return
        fns = {}
        for site, ids_TK in self.routes.items():
            base, logits = site.rsplit(".", 1)[0], {}
            fns[f"{base}.hook_router_logits"] = lambda v, s, logits=logits: logits.__setitem__("NE", v)
            fns[site] = lambda v, s, ids=ids_TK: _per_row(ids, v.shape[0])
            fns[f"{base}.hook_topk_gates"] = lambda v, s, ids=ids_TK, logits=logits: torch.sigmoid(   # as route()
                logits["NE"].gather(-1, _per_row(ids, v.shape[0])).float()).to(v.dtype)
        with hooks(self.model, fns):
            yield

    def baseline(self, kind="mean", images=None, blur_radius: float | None = None) -> torch.Tensor:
        """(I, D) baseline features x′ (see the module docstring)."""
        f = self.features
        if isinstance(kind, torch.Tensor):
            return kind.to(f).expand_as(f).clone()
        if kind == "zero":
            return torch.zeros_like(f)
        if kind == "mean":
            return f.mean(0, keepdim=True).expand_as(f).clone()
        if kind != "blur":
            raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {kind!r}")
        if images is None:
            raise ValueError("baseline='blur' needs the images")
        from PIL import ImageFilter

        blurred = []
        for im, lay in zip(_as_list(images), self.prepared.layouts):
            r = blur_radius if blur_radius is not None else 0.5 * lay.tile_size / lay.tokens_per_side * \
                lay.original_size[1] / lay.resized_size[1]
            blurred.append(load_image(im).filter(ImageFilter.GaussianBlur(r)))
        pv, layouts = self.model.image_processor(blurred)
        if layouts != self.prepared.layouts:
            raise ValueError("the blurred images were tiled differently from the originals; pass the same images")
        with torch.no_grad():
            return self.image_features(pv)

    def strings(self) -> list[str]:
        tok = self.model.tokenizer
        return [tok.decode([t]) if tok is not None else str(t) for t in self.target.tolist()]

    def result(self, method, scores_JI, **kw) -> AttributionResult:
        return AttributionResult(method, np.asarray(scores_JI, dtype=np.float32), self.target.cpu().numpy(),
                                 self.strings(), self.positions.cpu().numpy(), self.logprob.float().cpu().numpy(),
                                 self.prepared.patch_map, **kw)


# ------------------------------------------------------------------------------------- methods
def integrated_gradients(t: ImageTarget, baseline_ID: torch.Tensor, steps: int = 64, *, routing: str = "pinned",
                         internal_batch_size: int = 16, baseline_name: str = "mean") -> AttributionResult:
    """captum IntegratedGradients, one target at a time; `internal_batch_size` bounds activation memory."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(t)
    rows, deltas = [], []
    with t.routing(routing), torch.enable_grad():
        for j in range(len(t.target)):
            a, d = ig.attribute(t.features[None], baselines=baseline_ID[None], target=j, n_steps=steps,
                                method="gausslegendre", internal_batch_size=internal_batch_size,
                                return_convergence_delta=True)
            rows.append(a[0].sum(-1).detach().float().cpu())
            deltas.append(float(d))
        with torch.no_grad():
            y0 = t(baseline_ID[None])[0].float().cpu().numpy()
    return t.result("ig", torch.stack(rows), baseline=baseline_name, steps=steps, routing=routing,
                    baseline_logprob=y0, delta=np.asarray(deltas, dtype=np.float32))


def input_x_gradient(t: ImageTarget, *, routing: str = "pinned") -> AttributionResult:
    from captum.attr import InputXGradient

    gxi = InputXGradient(t)
    with t.routing(routing), torch.enable_grad():
        x = t.features[None].clone().requires_grad_(True)
        rows = [gxi.attribute(x, target=j)[0].sum(-1).detach().float().cpu()
                for j in range(len(t.target))]
    return t.result("gxi", torch.stack(rows), routing=routing)


def feature_ablation(t: ImageTarget, baseline_ID: torch.Tensor, groups: str = "token", *,
                     perturbations_per_eval: int = 8, baseline_name: str = "mean") -> AttributionResult:
    """captum FeatureAblation on the features: score = y(x) − y(x with the group set to the baseline)."""
    from captum.attr import FeatureAblation

    pm = t.prepared.patch_map
    if groups == "token":
        gid = np.arange(len(pm))
    elif groups == "tile":
        gid = np.unique(np.stack([pm.image, pm.tile], 1), axis=0, return_inverse=True)[1].reshape(-1)
    else:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    mask = torch.as_tensor(gid, device=t.features.device)[None, :, None].expand(1, -1, t.features.shape[1])
    with torch.no_grad():
        a = FeatureAblation(t).attribute(t.features[None], baselines=baseline_ID[None], feature_mask=mask,
                                         perturbations_per_eval=perturbations_per_eval)           # (J, I, D)
    return t.result("ablation", a[..., 0].float().cpu(), baseline=baseline_name, groups=groups)


def pixel_occlusion(t: ImageTarget, images, groups: str = "token", *, rgb=(255, 255, 255),
                    perturbations_per_eval: int = 4) -> AttributionResult:
    """captum FeatureAblation over `ImageMaskInput` segments of each original image (one at a time)."""
    from captum.attr import FeatureAblation
    from captum.attr._utils.interpretable_input import ImageMaskInput

    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    pm, images = t.prepared.patch_map, [load_image(im) for im in _as_list(images)]
    scores = np.full((len(t.target), len(pm)), np.nan, dtype=np.float32)
    for k, img in enumerate(images):
        tok_HW = pixel_token_map(pm, k)
        seg_HW = tok_HW if groups == "token" else pm.tile[tok_HW]

        def processor_fn(im, k=k):
            return t.model.image_processor([im if i == k else other for i, other in enumerate(images)])[0]
        inp = ImageMaskInput(img, mask=torch.from_numpy(seg_HW), baseline=tuple(rgb), processor_fn=processor_fn)

        def forward(present_BF, inp=inp):
            return torch.cat([t(t.image_features(inp.to_model_input(row[None]))[None]) for row in present_BF])
        with torch.no_grad():
            a = FeatureAblation(forward).attribute(inp.to_tensor(), perturbations_per_eval=perturbations_per_eval)
        a = a.reshape(len(t.target), -1).float().cpu().numpy()                                 # (J, F)
        for seg, f in inp.mask_id_to_idx.items():
            owner = np.unique(tok_HW[seg_HW == seg])        # the local tokens whose cells make the segment
            scores[:, owner] = a[:, [f]]
    return t.result("occlusion", scores, baseline=f"rgb{tuple(rgb)}", groups=groups)


# ------------------------------------------------------------------------------------- pixel mapping
def pixel_token_map(pm: PatchMap, image: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) index into the patch map of the LOCAL token whose 28×28-px canvas cell holds each pixel
    of the original image (science.md §4.2 step 3: tiles stitched, padding cropped, resized — done
    exactly, pixel centre → canvas cell, so each token covers precisely its `patch_map.box`).
    `size=(h, w)`: the same map sampled on an h×w display raster of the image."""
    lay = pm.layouts[image]
    (H, W), (nh, nw), cell = lay.original_size, lay.resized_size, lay.tile_size / lay.tokens_per_side
    h, w = size or (H, W)
    ry = np.floor((np.arange(h) + 0.5) * nh / h / cell).astype(np.int64)
    rx = np.floor((np.arange(w) + 0.5) * nw / w / cell).astype(np.int64)
    return pm.local_grid(image)[ry[:, None], rx[None, :]]


def pixel_global_map(pm: PatchMap, image: int = 0, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """(H, W) patch-map index of the global-tile token covering each pixel (the whole image squashed to
    one tile, §4.2 step 4), or None for one-tile images."""
    grid = pm.global_grid(image)
    if grid is None:
        return None
    g, (h, w) = pm.layouts[image].tokens_per_side, size or pm.layouts[image].original_size
    ry, rx = (np.floor((np.arange(n) + 0.5) * g / n).astype(np.int64) for n in (h, w))
    return grid[ry[:, None], rx[None, :]]


# ------------------------------------------------------------------------------------- attention views
def attention_views(model, prepared: Prepared, targets: Sequence[int], max_tokens: int = 4096) -> AttributionResult:
    """Attention-based companions (NOT attributions; science.md §4.1): from the q/k taps, each layer's
    attention probabilities A (H, T, T) under its own mask (chunked or global causal), then
      image_mass      (L, H, J)  Σ over image tokens of A[h, target row, :]
      image_attention (L, J, I)  head-mean A from each target row to each image token
      scores = rollout (J, I)    R = Â_L ⋯ Â_1, Â = ½·mean_h A + ½·I (Abnar & Zuidema 2020)
    Materialises T×T per layer: small inputs only (`max_tokens`)."""
    t = ImageTarget(model, prepared, targets)
    T = t.ids.shape[1]
    if T > max_tokens:
        raise ValueError(f"attention_views materialises {T}×{T} attention per layer; raise max_tokens={max_tokens} "
                         "to allow it")
    with torch.no_grad():
        _, cache = run_with_cache(model, t.ids, ["*.self_attn.hook_q", "*.self_attn.hook_k"],
                                  pixel_values=prepared.pixel_values.to(model.dtype))
        img = t.mask[0].nonzero()[:, 0]
        R, mass, per_tok = torch.eye(T), [], []
        for i, layer in enumerate(model.language_model.model.layers):
            A = attention_probs(cache[f"language_model.model.layers.{i}.self_attn.hook_q"][0],
                                cache[f"language_model.model.layers.{i}.self_attn.hook_k"][0],
                                layer.self_attn.scaling, layer.self_attn.chunk).cpu()          # (H, T, T)
            rows = A[:, t.positions.cpu()][:, :, img.cpu()]                                      # (H, J, I)
            mass.append(rows.sum(-1))
            per_tok.append(rows.mean(0))
            Ahat = 0.5 * A.mean(0) + 0.5 * torch.eye(T)
            R = (Ahat / Ahat.sum(-1, keepdim=True)) @ R
    rollout = R[t.positions.cpu()][:, img.cpu()]
    return t.result("attention_rollout", rollout, label=ATTENTION_LABEL, extras={
        "image_mass": (("layer", "head", "target"), torch.stack(mass).float().numpy()),
        "image_attention": (("layer", "target", "image_token"), torch.stack(per_tok).float().numpy())})


def attention_probs(q_THD: torch.Tensor, k_TKD: torch.Tensor, scale: float, chunk: int | None) -> torch.Tensor:
    """(H, T, T) softmax(q·kᵀ·scale) under the causal mask, restricted to the query's chunk when `chunk`
    (spec llama4.md §2.6); queries already carry RoPE/QK-norm/temperature (the hook_q tap)."""
    T, H = q_THD.shape[0], q_THD.shape[1]
    k = k_TKD.repeat_interleave(H // k_TKD.shape[1], dim=1)                                  # (T, H, Dh)
    s = torch.einsum("qhd,khd->hqk", q_THD.float(), k.float()) * scale
    i = torch.arange(T, device=s.device)
    visible = i[None, :] <= i[:, None]
    if chunk is not None:
        visible &= (i[None, :] // chunk) == (i[:, None] // chunk)
    return s.masked_fill(~visible, float("-inf")).softmax(-1)


# ------------------------------------------------------------------------------------- one call
def attribute(model, prompt: str, images, target=None, *, methods: Sequence[str] = ("ig",),
              baseline="mean", steps: int = 64, groups: Sequence[str] = GROUPS, routing: str = "pinned",
              internal_batch_size: int = 16, max_new_tokens: int = 8, rgb=(255, 255, 255),
              blur_radius: float | None = None, attention: bool = False,
              progress: bool = False) -> dict[str, AttributionResult]:
    """Attribute log p(target) to the image tokens of `prompt` (with `<|image|>` placeholders).

    target: an answer string, token ids, or None (each greedily generated token, up to max_new_tokens).
    methods: any of "ig", "gxi", "ablation", "occlusion" (a comma-separated string works too).
    Returns {"ig", "gxi", "ablation_token", "ablation_tile", "occlusion_token", "occlusion_tile",
    "attention"}: whichever were asked for."""
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ValueError(f"unknown methods {bad}; available: {list(METHODS)}")
    prepared = prepare(prompt, images, model.tokenizer, model)
    t = ImageTarget(model, prepared, target_ids(model, prepared, target, max_new_tokens))
    needs_base = {"ig", "ablation"} & set(methods)
    base = t.baseline(baseline, images, blur_radius) if needs_base else None
    name = baseline if isinstance(baseline, str) else "tensor"
    jobs = [(m, g) for m in methods for g in (groups if m in ("ablation", "occlusion") else [None])]
    bar = _bar(len(jobs) + attention, progress)
    out = {}
    for m, g in jobs:
        key = m if g is None else f"{m}_{g}"
        if m == "ig":
            out[key] = integrated_gradients(t, base, steps, routing=routing, internal_batch_size=internal_batch_size,
                                            baseline_name=name)
        elif m == "gxi":
            out[key] = input_x_gradient(t, routing=routing)
        elif m == "ablation":
            out[key] = feature_ablation(t, base, g, baseline_name=name)
        else:
            out[key] = pixel_occlusion(t, images, g, rgb=rgb)
        bar.update(1)
    if attention:
        out["attention"] = attention_views(model, prepared, t.target.tolist())
        bar.update(1)
    bar.close()
    return out


def _per_row(ids_TK: torch.Tensor, n: int) -> torch.Tensor:
    """The recorded (T, K) expert ids for the MoE's N = B·T flattened rows (batch-major)."""
    return ids_TK.repeat(n // ids_TK.shape[0], 1)


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="attribute", unit="method", disable=not enabled)
