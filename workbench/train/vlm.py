"""The `tiny-vlm` recipe: synthetic scenes (`scenes.py`) → BPE tokenizer → a Llama 4 vision-language
model trained end to end on CPU → HF `Llama4ForConditionalGeneration` checkpoint + evaluation.

    <|begin_of_text|><|image_start|><|patch|>×16 …<|image_end|>Question: What colour is the circle?\\nAnswer: red<|eot|>
                                                                                  loss on these ──┘───────┘

Vision: 64-px tiles of 8-px patches (8×8 patches), pixel shuffle 0.5 → a 4×4 grid of image tokens
per tile, each covering 16×16 px; wide and tall scenes get two tiles plus the global tile, exactly as
the released processor tiles 336-px images. Text: 4 layers with every layer kind (chunked-RoPE dense,
chunked-RoPE MoE, NoPE MoE; 4 experts + shared expert, top-1). The chunk size and floor_scale are 128,
longer than every prompt (~35–75 tokens): with a chunk of 32 (first try) the answer position sat in a
later chunk than the image, only the last (NoPE) layer could see the image, and after 500 steps the
model still answered from the question alone (colour 0.20, chance 0.17).

Loss: cross-entropy on the answer tokens and `<|eot|>` only (the prompt is given), plus the same
Switch load-balancing term as the text recipe (`loop.py`). Data: 40 % "Describe the scene." (every
object's size, colour and shape supervised), 12 % each one-word question type; for the first
`easy_steps` steps every scene has one object (a curriculum). Both came from failed first runs: with
one-word questions alone (2 supervised tokens per example) the model learned the answer priors and
ignored the image for 600+ steps, and shape — which the vision tower learns in ~300 steps when
supervised directly — was the last thing to appear. Accuracy is exact match of the greedy
answer: the answer tokens and `<|eot|>` are each the argmax given the prompt and the answer so far
(teacher-forced argmax ≡ greedy decoding of exactly that answer), per question type. The pointing
game (issue 9) asks, per attribution method, whether the highest-scoring image token's pixel box has
its centre inside the asked object's box; the random baseline is the expected hit rate of a
uniformly drawn image token of the same prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import Llama4TextConfig
from workbench.config_vision import Llama4Config, Llama4VisionConfig
from workbench.train import scenes

TEXT = dict(hidden_size=128, intermediate_size=128, intermediate_size_mlp=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
            attention_chunk_size=128, attn_temperature_tuning=True, floor_scale=128, attn_scale=0.1,
            use_qk_norm=True, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              vision_output_dim=128, projector_input_dim=128, projector_output_dim=128,
              image_size=64, patch_size=8, pixel_shuffle_ratio=0.5, rope_theta=10000.0)
MAX_TILES = 4                        # processor max_patches: up to a 2×2 canvas (+ global)
ROUTER_SITE = "language_model.model.layers.*.feed_forward.hook_router_logits"
HELDOUT_SEED = "heldout"
POINTING_TYPES = ("colour", "shape")
POINTING_METHODS = ("ig", "gxi", "ablation", "occlusion")


# ------------------------------------------------------------------------------------ model + tokenizer
def train_tokenizer(seed: int = 0, n_examples: int = 3000, vocab_size: int = 512):
    """BPE on question/answer texts: every question word and answer becomes one token or two."""
    from workbench.train.bpe import train_bpe

    texts = []
    for i in range(n_examples):
        ex = scenes.example(f"tok:{seed}", i)
        texts.append(f"Question: {ex.question}\nAnswer: {ex.answer}")
    return train_bpe(texts + scenes.all_texts(), vocab_size=vocab_size, exact=False)


def model_config(tok, **text_overrides) -> Llama4Config:
    from workbench.train.bpe import special_ids

    text = Llama4TextConfig(**(TEXT | text_overrides), vocab_size=tok.get_vocab_size(), **special_ids(tok))
    ids = {k: tok.token_to_id(t) for k, t in (("boi_token_index", "<|image_start|>"),
                                             ("eoi_token_index", "<|image_end|>"),
                                             ("image_token_index", "<|patch|>"))}
    return Llama4Config(text_config=text, vision_config=Llama4VisionConfig(**VISION), **ids)


def build(tok, seed: int = 0, **text_overrides):
    """A randomly initialised tiny-vlm with its tokenizer and image processor attached."""
    from workbench.checkpoint_vision import build_multimodal
    from workbench.image import ImageProcessor
    from workbench.tokenizer import TokenizerWrapper

    cfg = model_config(tok, **text_overrides)
    model = build_multimodal(cfg, seed=seed)
    model.tokenizer = TokenizerWrapper(tok, cfg.text_config.bos_token_id, list(cfg.text_config.eos_token_id))
    model.language_model.tokenizer = model.tokenizer
    model.image_processor = ImageProcessor.from_config(cfg, max_patches=MAX_TILES)
    return model


# ------------------------------------------------------------------------------------ batches
def encode(model, ex: scenes.Example) -> tuple[list[int], list[int], torch.Tensor, object]:
    """(ids, labels, pixel_values, prepared) of one example: labels are -100 except for the answer
    tokens and `<|eot|>` (labels[t] is the token at t+1, as the logits at t predict it)."""
    from workbench.image import prepare

    tok = model.tokenizer
    p = prepare(scenes.prompt_text(ex.question), [ex.image], tok, model.image_processor)
    prompt = p.input_ids[0].tolist()
    answer = tok.encode(" " + ex.answer, add_bos=False) + [eot_id(model)]
    ids = prompt + answer
    labels = [-100] * (len(prompt) - 1) + answer + [-100]
    return ids, labels, p.pixel_values.float(), p


def eot_id(model) -> int:
    return model.tokenizer.token_to_id("<|eot|>")


def collate(model, examples: list[scenes.Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), labels (B, T) and all tiles (N, 3, S, S) in batch order (causal
    attention: padding after a row's last token never changes that row's earlier logits)."""
    enc = [encode(model, ex) for ex in examples]
    T = max(len(e[0]) for e in enc)
    pad = model.config.text_config.pad_token_id
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    labels = torch.full((len(enc), T), -100, dtype=torch.long)
    for b, (i, lab, _, _) in enumerate(enc):
        ids[b, :len(i)] = torch.tensor(i)
        labels[b, :len(lab)] = torch.tensor(lab)
    return ids, labels, torch.cat([e[2] for e in enc])


def batches(model, seed: int, batch_size: int, easy_steps: int = 0):
    """batch_fn(step) for `loop.train`: examples (step·B … step·B+B−1) of the training stream; for
    the first `easy_steps` steps every scene has a single object (a curriculum: see the module doc)."""
    def fn(step: int):
        cap = 1 if step < easy_steps else None
        return collate(model, [scenes.example(f"train:{seed}", step * batch_size + b, max_objects=cap)
                               for b in range(batch_size)])
    return fn


def heldout(n_per_type: int, seed=HELDOUT_SEED) -> dict[str, list[scenes.Example]]:
    return {q: [scenes.example(f"{seed}:{q}", i, q) for i in range(n_per_type)] for q in scenes.QUESTION_TYPES}


# ------------------------------------------------------------------------------------ vision pretraining
def token_labels(model, examples: list[scenes.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (N, 3, S, S) and per-image-token labels (I, 3): the shape, colour and size index
    (+1; 0 = background) of the object whose box holds the token's pixel-box centre."""
    from workbench.image import patch_map

    pv, layouts = model.image_processor([ex.image for ex in examples])
    pm = patch_map(layouts)
    labels = torch.zeros(len(pm), 3, dtype=torch.long)
    for i in range(len(pm)):
        for o in examples[int(pm.image[i])].objects:
            if scenes.box_hit(pm.box[i], o.box):
                labels[i] = torch.tensor([scenes.SHAPES.index(o.shape) + 1, list(scenes.COLOURS).index(o.colour) + 1,
                                          list(scenes.SIZES).index(o.size) + 1])
    return pv.float(), labels


def pretrain_vision(model, seed: int, steps: int, batch_size: int = 32, lr: float = 2e-3,
                    progress: bool = True) -> list[dict]:
    """Stage 0: train the vision tower and projector alone to name, from each image token, the
    shape / colour / size of the object under it (three linear heads on the projected features,
    discarded afterwards) — as Llama 4's own vision encoder is pretrained before early fusion. The
    VLM then trains end to end from there. Returns the per-step history."""
    from tqdm.auto import tqdm

    D = model.config.text_config.hidden_size
    sizes = (len(scenes.SHAPES) + 1, len(scenes.COLOURS) + 1, len(scenes.SIZES) + 1)
    heads = torch.nn.ModuleList(torch.nn.Linear(D, n) for n in sizes)
    params = [*model.vision_model.parameters(), *model.multi_modal_projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    for step in tqdm(range(steps), disable=not progress, desc="vision pretraining", unit="step"):
        ex = [scenes.example(f"vision:{seed}", step * batch_size + b) for b in range(batch_size)]
        pv, lab = token_labels(model, ex)
        feats = model.get_image_features(pv)                                  # (I, D)
        losses = [F.cross_entropy(h(feats), lab[:, j]) for j, h in enumerate(heads)]
        loss = sum(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            obj = lab[:, 0] > 0
            acc = float((heads[0](feats[obj]).argmax(-1) == lab[obj, 0]).float().mean()) if obj.any() else 0.0
        history.append({"step": step + 1, "loss": float(loss.detach()), "shape_acc_on_objects": acc})
    return history


# ------------------------------------------------------------------------------------ loss + accuracy
def vlm_loss(model, batch, s) -> dict[str, torch.Tensor]:
    from workbench.instrument.hooks import hooks
    from workbench.train.loop import load_balancing_loss, router_z_loss

    ids, labels, pv = batch
    logits: list[torch.Tensor] = []
    with hooks(model, {ROUTER_SITE: lambda v, _site: logits.append(v)}):
        out = model(ids, pv).logits
    ce = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-100)
    k = model.config.text_config.num_experts_per_tok
    zero = ce.new_zeros(())
    bal = sum((load_balancing_loss(r, k) for r in logits), zero)
    z = sum((router_z_loss(r) for r in logits), zero)
    n = max(len(logits), 1)
    return {"loss": ce + s.aux_coef * bal + s.z_coef * z, "ce": ce, "balance": bal / n, "z": z / n}


@torch.no_grad()
def accuracy(model, examples: list[scenes.Example], batch: int = 32) -> tuple[float, float]:
    """(exact-match accuracy of the greedy answer, mean answer cross-entropy)."""
    was = model.training
    model.eval()
    right, ce_sum, n_tok = 0, 0.0, 0
    for a in range(0, len(examples), batch):
        ids, labels, pv = collate(model, examples[a:a + batch])
        logits = model(ids, pv).logits.float()
        m = labels != -100
        ok = (logits.argmax(-1) == labels) | ~m
        right += int(ok.all(dim=1).sum())
        ce_sum += float(F.cross_entropy(logits[m], labels[m], reduction="sum"))
        n_tok += int(m.sum())
    model.train(was)
    return right / len(examples), ce_sum / max(n_tok, 1)


def eval_fn(sets: dict[str, list[scenes.Example]]):
    def fn(m) -> dict[str, float]:
        return {f"acc_{q}": accuracy(m, ex)[0] for q, ex in sets.items()}
    return fn


# ------------------------------------------------------------------------------------ pointing game
def pointing_game(model, examples: list[scenes.Example], methods=POINTING_METHODS, steps: int = 32,
                  progress: bool = False) -> dict:
    """Per method: share of questions whose top-scoring image token has its box centre inside the asked
    object's box; plus the random baseline (mean share of a question's image tokens that would hit).
    Scores are summed over the answer's tokens; NaN scores (occlusion leaves global tokens unscored)
    never win. Only questions the model answers correctly count (an attribution of a wrong answer
    says nothing about where the right object is); their number is reported."""
    from tqdm.auto import tqdm

    from probes.attribution import attribute

    hits = {m: 0 for m in methods}
    hits["attention_rollout"] = 0
    base, n, skipped = 0.0, 0, 0
    for ex in tqdm(examples, disable=not progress, desc="pointing game", unit="question"):
        if accuracy(model, [ex])[0] < 1.0:
            skipped += 1
            continue
        res = attribute(model, scenes.prompt_text(ex.question), [ex.image], " " + ex.answer,
                        methods=methods, steps=steps, groups=("token",), attention=True)
        boxes = next(iter(res.values())).patch_map.box
        inside = np.array([scenes.box_hit(b, ex.target.box) for b in boxes])
        base += inside.mean()
        n += 1
        for key, r in res.items():
            name = key.removesuffix("_token")
            name = "attention_rollout" if name == "attention" else name
            s = np.nan_to_num(np.asarray(r.scores, dtype=np.float64).sum(0), nan=-np.inf)
            hits[name] += bool(inside[int(np.argmax(s))])
    out = {m: hits[m] / max(n, 1) for m in hits}
    return {"hit_rate": out, "random_baseline": float(base / max(n, 1)), "questions": n,
            "skipped_wrong_answers": skipped}


# ------------------------------------------------------------------------------------ the recipe
def run(out: str | Path, work_dir: str | Path, settings=None, *, eval_per_type: int = 200,
        pointing_per_type: int = 40, progress: bool = True, evaluate: bool = True, easy_steps: int = 300,
        vision_steps: int = 1500) -> dict:
    """Train tiny-vlm, save it as a HF checkpoint at `out`, evaluate; returns the eval dict."""
    from workbench.checkpoint import _atomic
    from workbench.checkpoint_vision import save_multimodal
    from workbench.train.loop import TrainSettings, atomic_torch_save, train, write_loss_curve

    s = settings or TrainSettings(steps=2500, batch_size=32, seq_len=0, lr=2e-3, warmup=100, eval_every=250)
    out, work_dir = Path(out), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(s.threads or torch.get_num_threads())
    tok_path = work_dir / "tokenizer.json"
    if tok_path.exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(s.seed)
        _atomic(tok_path, lambda p: tok.save(str(p)))
    model = build(tok, seed=s.seed)
    stage0 = work_dir / "vision_pretrained.pt"         # stage 0 runs once; a resumed run reuses it
    vision_history = []
    if vision_steps and not (work_dir / "state.pt").exists():
        if stage0.exists():
            model.load_state_dict(torch.load(stage0, weights_only=True))
        else:
            vision_history = pretrain_vision(model, s.seed, vision_steps, s.batch_size, s.lr, progress)
            atomic_torch_save(model.state_dict(), stage0)
    val = heldout(25, seed=f"val:{s.seed}")
    history = train(model, None, {}, s, work_dir=work_dir, progress=progress,
                    batch_fn=batches(model, s.seed, s.batch_size, easy_steps), loss_fn=vlm_loss,
                    eval_fn=eval_fn(val))
    wall = time.perf_counter() - t0
    save_multimodal(model, out)
    write_loss_curve(history, out, title=f"{out.name}: {s.steps} steps × {s.batch_size} questions")
    if vision_history:
        (out / "vision_pretraining.json").write_text(json.dumps(vision_history[::10] + vision_history[-1:]))
    result = {"settings": dict(vars(s)), "data": {"easy_steps": easy_steps, "vision_steps": vision_steps,
                                                  "question_weights": dict(zip(scenes.QUESTION_TYPES,
                                                                               scenes.QUESTION_WEIGHTS))},
              "train_wall_seconds": round(wall, 1),
              "train_seconds_in_steps": round(sum(h.get("seconds", 0.0) for h in history), 1)}
    if evaluate:
        result["report"] = evaluate_dir(out, eval_per_type, pointing_per_type, progress=progress)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_dir(model_dir: str | Path, per_type: int = 200, pointing_per_type: int = 40, *,
                 steps: int = 32, progress: bool = False, threads: int | None = None) -> dict:
    """The model card's tables, recomputed from the saved checkpoint (fp32, held-out scenes)."""
    import workbench

    if threads:
        torch.set_num_threads(threads)
    model = workbench.load_model(str(model_dir), dtype="fp32", device="cpu")
    if not hasattr(model, "vision_model"):
        raise ValueError(f"{model_dir}: a text-only model; eval-vlm evaluates a vision-language model such as "
                         "tiny-vlm (for tiny-moe use `workbench train eval`)")
    sets = heldout(per_type)
    acc = {}
    for q, ex in sets.items():
        a, ce = accuracy(model, ex)
        acc[q] = {"accuracy": round(a, 4), "answer_ce": round(ce, 4), "questions": len(ex)}
    chance = {"colour": 1 / len(scenes.COLOURS), "shape": 1 / len(scenes.SHAPES), "size": 0.5, "position": 0.5}
    for q, c in chance.items():
        acc[q]["chance"] = round(c, 4)
    pg = {}
    for q in POINTING_TYPES:
        pg[q] = pointing_game(model, sets[q][:pointing_per_type], steps=steps, progress=progress)
    return {"accuracy": acc, "pointing_game": pg, "ig_steps": steps}


def report_markdown(report: dict) -> str:
    out = ["Held-out exact-match accuracy of the greedy answer (question types as in `scenes.py`)\n",
           "| question type | accuracy | chance | answer CE (nats) | questions |", "|---|---|---|---|---|"]
    for q, r in report["accuracy"].items():
        chance = f"{r['chance']:.2f}" if "chance" in r else "—"
        out.append(f"| {q} | {r['accuracy']:.3f} | {chance} | {r['answer_ce']:.3f} | {r['questions']} |")
    out += ["", "Attribution pointing game: share of correctly answered questions whose highest-scoring image "
                "token's pixel box has its centre inside the asked object's box\n"]
    methods = list(next(iter(report["pointing_game"].values()))["hit_rate"])
    out += ["| question type | questions | random baseline | " + " | ".join(methods) + " |",
            "|---" * (3 + len(methods)) + "|"]
    for q, r in report["pointing_game"].items():
        out.append(f"| {q} | {r['questions']} | {r['random_baseline']:.3f} | "
                   + " | ".join(f"{r['hit_rate'][m]:.3f}" for m in methods) + " |")
    return "\n".join(out)
