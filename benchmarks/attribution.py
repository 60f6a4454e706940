"""Image attribution cost, side by side: wall time and peak memory of integrated gradients and tile
occlusion for one image on the `tiny-vision` preset — `probes.attribution.attribute` on our model vs.
captum driving `transformers`' Llama4ForConditionalGeneration on the same weights (issue 5).

    python benchmarks/attribution.py            # 3 fresh processes per cell, 1 and 2 threads; writes the
                                                #   "attribution" section of docs/benchmarks.md
    python benchmarks/attribution.py --quick    # tiny image, 4 IG steps, one process per cell; prints only

Every cell runs in a fresh subprocess (`--cell`): build the model and inputs, record ru_maxrss as the
baseline, run the attribution once untimed (warm-up) and once timed, and report the wall time and
ru_maxrss − baseline (the attribution's own peak resident memory; the high-water mark covers both runs).

The transformers side. transformers 5.24's composite forward crashes when given pixel values, so it is
composed from HF's own modules exactly as that forward does (as tests/test_vision.py does):
get_image_features → multi_modal_projector → scatter into the token embeddings at `<|patch|>` →
language_model(inputs_embeds). The score is log p(target) at the last prompt position.
  ig:        captum IntegratedGradients on the projected image features, n_steps as ours, Gauss–Legendre,
             the mean-feature baseline and internal_batch_size=16 (what ours uses by default).
  occlusion: captum FeatureAblation on the pixel values with one group per tile (global tile included),
             the baseline being the processed all-white image — ours occludes each local tile's region of
             the original image with white and re-tiles it (so its global thumbnail changes too); both
             re-run the vision tower and the language model once per tile.
Both sides get the same pixel values (our image processor) and the same single target token.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine_info, markdown_table, pin_threads, write_section  # noqa: E402

PROMPT = "Describe <|image|> please"
TITLE = "Benchmarks"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def _image(size):
    import numpy as np
    from PIL import Image

    h, w = size
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_model(ours):
    from transformers import Llama4Config as HFConfig
    from transformers import Llama4ForConditionalGeneration as HF
    from transformers import Llama4TextConfig as HFText

    cfg = ours.config
    d = cfg.text_config.hf_kwargs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hc = HFConfig(text_config=HFText(**d).to_dict(), vision_config=cfg.vision_config.to_hf(),
                      boi_token_index=cfg.boi_token_index, eoi_token_index=cfg.eoi_token_index,
                      image_token_index=cfg.image_token_index)
    hc.text_config._attn_implementation = "eager"
    hf = HF(hc).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf


class HFScore(torch.nn.Module):
    """log p(target | prompt with image) through transformers' modules, from features or pixels."""

    def __init__(self, hf, ids, target):
        super().__init__()
        self.hf, self.ids, self.target = hf, ids, target
        with torch.no_grad():
            self.embed = hf.language_model.get_input_embeddings()(ids)                 # (1, T, D)
        self.mask = (ids[0] == hf.config.image_token_index)                           # (T,)

    def features(self, pixel_values):
        feats = self.hf.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.hf.multi_modal_projector(feats.reshape(-1, feats.size(-1)))          # (I, D)

    def from_features(self, feats_BID):
        emb = self.embed.expand(feats_BID.shape[0], -1, -1).clone()
        emb[:, self.mask] = feats_BID.to(emb.dtype)
        logits = self.hf.language_model(inputs_embeds=emb).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)[:, self.target]                     # (B,)

    def from_pixels(self, pv_BNCHW):
        return torch.cat([self.from_features(self.features(pv)[None]) for pv in pv_BNCHW])


def run_cell(side: str, method: str, threads: int, size, steps: int) -> dict:
    pin_threads(threads)
    import workbench
    from probes.attribution import attribute
    from workbench.image import prepare

    model = workbench.load_model("tiny-vision")
    img = _image(size)
    target = model.tokenizer.encode("a", add_bos=False)[:1]
    if side == "ours":
        def job():
            attribute(model, PROMPT, [img], target, methods=method, steps=steps, groups=("tile",))
    else:
        from captum.attr import FeatureAblation, IntegratedGradients

        hf = _hf_model(model)
        p = prepare(PROMPT, [img], model.tokenizer, model)
        score = HFScore(hf, p.input_ids, target[0])
        pv = p.pixel_values.float()
        if method == "ig":
            def job():
                with torch.no_grad():
                    f = score.features(pv)[None]
                base = f.mean(1, keepdim=True).expand_as(f).clone()
                with torch.enable_grad():
                    IntegratedGradients(score.from_features).attribute(
                        f, baselines=base, n_steps=steps, method="gausslegendre", internal_batch_size=16)
        else:
            white, _ = model.image_processor([_white(size)])
            mask = torch.arange(pv.shape[0]).view(1, -1, 1, 1, 1).expand(1, -1, *pv.shape[1:])

            def job():
                with torch.no_grad():
                    FeatureAblation(score.from_pixels).attribute(pv[None], baselines=white.float()[None],
                                                                 feature_mask=mask)
    base = _rss_mib()
    job()                                                                      # warm-up
    t0 = time.perf_counter()
    job()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_mib": _rss_mib() - base, "base_mib": base}


def _white(size):
    from PIL import Image

    return Image.new("RGB", (size[1], size[0]), (255, 255, 255))


def measure(side, method, threads, size, steps) -> dict:
    cmd = [sys.executable, __file__, "--cell", side, method, str(threads), f"{size[0]}x{size[1]}", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one process per cell; no docs write")
    ap.add_argument("--repeats", type=int, default=None, help="fresh processes per cell (default 3; quick 1)")
    ap.add_argument("--cell", nargs=5, metavar=("SIDE", "METHOD", "THREADS", "HxW", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        side, method, threads, hw, steps = a.cell
        size = tuple(int(x) for x in hw.split("x"))
        print(json.dumps(run_cell(side, method, int(threads), size, int(steps))))
        return
    size, steps = ((40, 50), 4) if a.quick else ((100, 150), 32)
    repeats = a.repeats or (1 if a.quick else 3)
    thread_counts = (1,) if a.quick else (1, 2)
    rows = []
    for threads in thread_counts:
        for method in ("ig", "occlusion"):
            res = {}
            for side in ("ours", "transformers+captum"):
                runs = [measure(side, method, threads, size, steps) for _ in range(repeats)]
                res[side] = (statistics.median(r["wall_s"] for r in runs), max(r["peak_mib"] for r in runs))
            (to, mo), (th, mh) = res["ours"], res["transformers+captum"]
            label = f"IG ({steps} steps)" if method == "ig" else "tile occlusion"
            rows.append([label, threads, f"{to:.3f}", f"{th:.3f}", f"{th / to:.2f}x", f"{mo:.1f}", f"{mh:.1f}"])
            print(f"{label} threads={threads}: ours {to:.3f}s / {mo:.1f} MiB, "
                  f"transformers+captum {th:.3f}s / {mh:.1f} MiB", flush=True)
    table = markdown_table(["method", "threads", "ours s", "transformers+captum s", "speedup",
                            "ours peak MiB", "transformers+captum peak MiB"], rows)
    print(table)
    if a.quick:
        return
    info = machine_info()
    body = "\n".join([
        "## Image attribution (tiny-vision, one image)",
        "",
        f"`python benchmarks/attribution.py`: one {size[0]}×{size[1]} image ({PROMPT!r}, one target token) on "
        "`tiny-vision` random weights, fp32 CPU. Ours: `probes.attribution.attribute(..., methods=\"ig\" | "
        f"\"occlusion\", steps={steps}, groups=(\"tile\",))`. Theirs: captum `IntegratedGradients` "
        f"(n_steps={steps}, Gauss–Legendre, mean baseline, internal_batch_size=16) on the projected image "
        "features and `FeatureAblation` over a per-tile pixel mask with a white baseline, driving "
        "transformers' `Llama4ForConditionalGeneration` modules (vision tower → projector → scatter → "
        "language model; its composite forward crashes on pixel values) on the same weights.",
        "",
        f"Each cell: median wall time of {repeats} fresh processes (one warm-up call, one timed call each); "
        "peak MiB = max over those processes of ru_maxrss after the calls minus ru_maxrss after imports, "
        "model and input construction.",
        "",
        table,
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items() if k != "torch threads"),
    ])
    write_section("attribution", body, TITLE)
    print("wrote docs/benchmarks.md (attribution section)")


if __name__ == "__main__":
    main()
