"""The tiny-vlm: synthetic scenes and their questions (known cases), the training batch layout, a
seconds-long training smoke test with exact resume, and the shipped `workbench/models/tiny-vlm`
(loads by name, answers held-out colour/shape questions, attributions point at the asked object)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from workbench.train import scenes, vlm
from workbench.train.loop import TrainSettings, train


@pytest.fixture(scope="module")
def tok():
    return vlm.train_tokenizer(0, n_examples=300)


# ------------------------------------------------------------------------------ scenes
def test_scenes_are_deterministic_and_objects_are_drawn_inside_their_boxes():
    a, b = scenes.example("t", 7), scenes.example("t", 7)
    assert a.question == b.question and a.objects == b.objects
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for i in range(40):
        ex = scenes.example("t", i)
        px = np.asarray(ex.image).astype(int)
        H, W = px.shape[:2]
        assert (H, W) in scenes.CANVASES
        for o in ex.objects:
            x0, y0, x1, y1 = o.box
            assert 0 < x0 < x1 <= W and 0 < y0 < y1 <= H
            cx, cy = int(o.centre[0]), int(o.centre[1])
            ref = np.array(scenes.COLOURS[o.colour])
            assert np.abs(px[cy, cx] - ref).max() <= 15, (o, px[cy, cx])        # the centre has its colour
        for p, q in [(p, q) for p in ex.objects for q in ex.objects if p is not q]:
            assert not scenes._overlap(p.box, q.box, margin=0)


def test_answers_are_true_of_the_scene():
    for i in range(300):
        ex = scenes.example("truth", i)
        objs = ex.objects
        if ex.qtype == "colour":
            assert [o.colour for o in objs if o.shape == ex.target.shape] == [ex.answer]
        elif ex.qtype == "shape":
            assert [o.shape for o in objs if o.colour == ex.target.colour] == [ex.answer]
        elif ex.qtype == "count":
            shape = ex.question.split()[2][:-1]
            assert ex.answer == str(sum(o.shape == shape for o in objs))
        elif ex.qtype == "size":
            assert ex.answer == ex.target.size
        elif ex.qtype == "describe":
            left_to_right = sorted(objs, key=lambda o: o.centre)
            assert ex.answer == ", ".join(f"{o.size} {o.colour} {o.shape}" for o in left_to_right)
        else:
            left = ex.target.centre[0] < ex.image.width / 2
            assert ex.answer == ("left" if left else "right")
            assert abs(ex.target.centre[0] - ex.image.width / 2) >= 8


def test_ask_declines_what_cannot_be_asked():
    two_circles = [scenes.SceneObject("circle", "red", "big", (1, 1, 27, 27)),
                   scenes.SceneObject("circle", "blue", "big", (30, 30, 56, 56))]
    rng = random.Random(0)
    assert scenes.ask(rng, two_circles, 64, "colour") is None           # "the circle" is ambiguous
    assert scenes.ask(rng, two_circles, 64, "shape")[2] == "circle"
    with pytest.raises(ValueError, match="unknown question type 'smell'"):
        scenes.ask(rng, two_circles, 64, "smell")


def test_box_hit_uses_the_token_centre():
    assert scenes.box_hit((0, 0, 16, 16), (4, 4, 20, 20))                # centre (8, 8) inside
    assert not scenes.box_hit((0, 0, 16, 16), (9, 0, 30, 30))
    assert not scenes.box_hit((float("nan"),) * 4, (0, 0, 64, 64))       # padding-only tokens never hit


# ------------------------------------------------------------------------------ batches
def test_batch_labels_cover_exactly_the_answer_and_eot(tok):
    model = vlm.build(tok)
    ex = [scenes.example("b", i) for i in range(4)]
    ids, labels, pv = vlm.collate(model, ex)
    eot = vlm.eot_id(model)
    for b, e in enumerate(ex):
        want = model.tokenizer.encode(" " + e.answer, add_bos=False) + [eot]
        lab = labels[b][labels[b] != -100].tolist()
        assert lab == want
        first = int((labels[b] != -100).nonzero()[0])
        assert ids[b, first + 1:first + 1 + len(want)].tolist() == want           # labels[t] = ids[t+1]
        assert model.tokenizer.decode(ids[b, :first + 1].tolist()).endswith("Answer:")
    tiles = sum(1 if e.image.size == (64, 64) else 3 for e in ex)
    assert pv.shape == (tiles, 3, 64, 64)
    assert int((ids == model.config.image_token_index).sum()) == tiles * 16


def test_vision_pretraining_labels_each_token_with_the_object_under_it(tok):
    model = vlm.build(tok)
    ex = [scenes.example("lab", i) for i in range(6)]
    pv, lab = vlm.token_labels(model, ex)
    from workbench.image import patch_map

    pm = patch_map(model.image_processor([e.image for e in ex])[1])
    assert lab.shape == (len(pm), 3) and pv.shape[0] == sum(1 if e.image.size == (64, 64) else 3 for e in ex)
    for i in range(len(pm)):
        hits = [o for o in ex[int(pm.image[i])].objects if scenes.box_hit(pm.box[i], o.box)]
        if hits:
            o = hits[0]
            assert lab[i].tolist() == [scenes.SHAPES.index(o.shape) + 1, list(scenes.COLOURS).index(o.colour) + 1,
                                       list(scenes.SIZES).index(o.size) + 1]
        else:
            assert lab[i].tolist() == [0, 0, 0]
    for j, e in enumerate(ex):                       # every object (≥ 18 px) owns at least one 16-px token
        for o in e.objects:
            assert any(scenes.box_hit(pm.box[i], o.box) for i in range(len(pm)) if pm.image[i] == j), (j, o)
    h = vlm.pretrain_vision(model, 0, steps=3, batch_size=4, progress=False)
    assert len(h) == 3 and all(np.isfinite(x["loss"]) for x in h)


def test_config_has_every_layer_kind_and_image_tokens_in_the_vocabulary(tok):
    cfg = vlm.model_config(tok)
    kinds = set(cfg.text_config.layer_kinds())
    assert {"rope-chunked/dense", "rope-chunked/moe", "nope-global/moe"} <= kinds
    V = cfg.text_config.vocab_size
    for t in ("<|image_start|>", "<|image_end|>", "<|patch|>", "<|image|>", "<|eot|>"):
        assert tok.token_to_id(t) is not None and tok.token_to_id(t) < V
    assert cfg.image_token_index == tok.token_to_id("<|patch|>")


def test_training_smoke_learns_and_resumes_exactly(tok, tmp_path):
    torch.manual_seed(0)
    s = TrainSettings(steps=6, batch_size=8, seq_len=0, lr=3e-3, warmup=2, eval_every=100, ckpt_every=100,
                      threads=1)

    def run(work=None, stop=None, model=None):
        m = model or vlm.build(tok, seed=0)
        h = train(m, None, {}, s, work_dir=work, progress=False, stop_after=stop,
                  batch_fn=vlm.batches(m, 0, s.batch_size), loss_fn=vlm.vlm_loss)
        return m, h

    ref, h_ref = run()
    ce = [h["ce"] for h in h_ref if "ce" in h]
    assert ce[-1] < ce[0]
    run(tmp_path, stop=3)
    res, h_res = run(tmp_path)
    assert [h["ce"] for h in h_res if "ce" in h] == pytest.approx(ce, rel=1e-5)
    for (n, a), (_, b) in zip(ref.state_dict().items(), res.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_train_vlm_cli_is_wired():
    import argparse

    from workbench.train.cli import add_train_parser

    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="cmd"))
    assert p.parse_args(["train", "vlm", "--out", "x"]).fn.__name__ == "cmd_train_vlm"
    assert p.parse_args(["train", "eval-vlm", "x"]).fn.__name__ == "cmd_train_eval_vlm"


# ------------------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def shipped():
    import workbench
    from workbench.bundled import MODELS_DIR

    path = MODELS_DIR / "tiny-vlm"
    assert (path / "model.safetensors").exists(), f"{path} is shipped in the repo; it is missing"
    assert (path / "model.safetensors").stat().st_size < 25e6
    return workbench.load_model("tiny-vlm", dtype="fp32", device="cpu")


def test_shipped_vlm_loads_by_name_with_its_processor(shipped):
    from workbench.model.multimodal import Llama4ForConditionalGeneration

    assert isinstance(shipped, Llama4ForConditionalGeneration)
    assert shipped.image_processor.tile_size == 64 and shipped.image_processor.max_patches == vlm.MAX_TILES
    assert shipped.tokenizer.token_to_id("<|patch|>") == shipped.config.image_token_index


@pytest.mark.parametrize("qtype", ["colour", "shape"])
def test_shipped_vlm_answers_heldout_colour_and_shape(shipped, qtype):
    ex = vlm.heldout(60)[qtype]
    acc, _ = vlm.accuracy(shipped, ex)
    assert acc >= 0.9, f"{qtype} accuracy {acc:.3f} (model card target ≥ 0.9)"


def test_shipped_vlm_generates_the_answer(shipped):
    from workbench.image import prepare

    ex = vlm.heldout(5)["colour"][0]
    p = prepare(scenes.prompt_text(ex.question), [ex.image], shipped.tokenizer, shipped)
    with torch.no_grad():
        out = shipped(p.input_ids, p.pixel_values.float())
    first = int(out.logits[0, -1].argmax())
    assert shipped.tokenizer.decode([first]).strip() == ex.answer


@pytest.mark.slow
def test_shipped_vlm_attribution_points_at_the_asked_object_more_than_chance(shipped):
    ex = vlm.heldout(12)["colour"]
    pg = vlm.pointing_game(shipped, ex, methods=("ig", "ablation"), steps=16)
    assert pg["questions"] >= 8
    for m in ("ig", "ablation"):
        assert pg["hit_rate"][m] > 2 * pg["random_baseline"], pg


def test_bundled_models_are_package_data():
    """Both trained models ship in the wheel: pyproject's package-data globs cover every file of them
    (a wheel built from this tree lists all 16; checked by hand with `pip wheel .`)."""
    import fnmatch

    import tomllib
    from conftest import REPO

    from workbench.bundled import BUNDLED, MODELS_DIR

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["workbench"]
    for name in BUNDLED:
        files = [p.relative_to(MODELS_DIR.parent).as_posix() for p in (MODELS_DIR / name).iterdir()]
        assert {"models/" + name + "/config.json", "models/" + name + "/model.safetensors",
                "models/" + name + "/tokenizer.json", "models/" + name + "/TRAINING.md"} <= set(files)
        missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
        assert not missing, f"not package data: {missing}"
