"""Synthetic scenes for the `tiny-vlm`: coloured shapes drawn with PIL, and questions about them.

    Scene      1–2 objects on a light background (2–3 on wide/tall images), never overlapping;
               each object = shape × colour × size at a position, with its pixel box kept
    sizes      64×64 (one tile), 128×64 or 64×128 (two tiles + a global tile) — the tile is 64 px
    shapes     circle, square, triangle, diamond          colours  red, green, blue, yellow, purple, orange
    sizes      small (18–22 px) and big (28–32 px)

Question types (each answer is one word, except `describe`; the answer's object is the one the
attribution pointing game checks):

    colour     "What colour is the {shape}?"                 only when exactly one object has that shape
    shape      "What shape is the {colour} object?"          only when exactly one object has that colour
    count      "How many {shape}s are there?"                 0–5; any shape, present or not
    size       "Is the {colour} {shape} big or small?"
    position   "Is the {colour} {shape} on the left or the right?"   centre ≥ 8 px from the middle
    describe   "Describe the scene."  → "big red circle, small blue square"  (left to right by centre x)

`describe` is the dense signal: every object's size, colour and shape are supervised on every such
example, so the vision path learns from the first steps; with the one-word questions alone (2
supervised tokens per example) the model first learned the answer priors and ignored the image.

A scene and its question are a function of (seed, index) only, so a training run resumed at step s
sees the same examples, and the held-out set (another seed) is fixed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 20)}
SIZES = {"small": (18, 22), "big": (28, 32)}
QUESTION_TYPES = ("colour", "shape", "count", "size", "position", "describe")
QUESTION_WEIGHTS = (0.12, 0.12, 0.12, 0.12, 0.12, 0.4)       # training mixture (describe: the dense signal)
CANVASES = ((64, 64), (64, 128), (128, 64))          # (height, width)
CANVAS_WEIGHTS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]       # x0, y0, x1, y1 in pixels (x1, y1 exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Example:
    image: Image.Image
    objects: list[SceneObject]
    qtype: str
    question: str
    answer: str                          # one word (a list for `describe`), no leading space
    target: SceneObject | None           # the object the question is about (None for count)


def draw_scene(rng: random.Random, size: tuple[int, int] | None = None,
               max_objects: int | None = None) -> tuple[Image.Image, list[SceneObject]]:
    """A scene of non-overlapping objects; `size` = (height, width), else drawn from CANVASES;
    `max_objects` caps the count (the training curriculum starts with one object)."""
    H, W = size or rng.choices(CANVASES, CANVAS_WEIGHTS)[0]
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (W, H), bg)
    draw = ImageDraw.Draw(img)
    want = rng.randint(1, 2) if H * W <= 64 * 64 else rng.randint(2, 3)
    want = min(want, max_objects or want)
    objects: list[SceneObject] = []
    for _ in range(want * 20):                          # rejection sampling of free positions
        if len(objects) == want:
            break
        size_name = rng.choice(tuple(SIZES))
        s = rng.randint(*SIZES[size_name])
        x0, y0 = rng.randint(1, W - s - 1), rng.randint(1, H - s - 1)
        box = (x0, y0, x0 + s, y0 + s)
        if any(_overlap(box, o.box, margin=3) for o in objects):
            continue
        obj = SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size_name, box)
        _draw(draw, obj, rng)
        objects.append(obj)
    return img, objects


def _overlap(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, rng: random.Random) -> None:
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[o.colour])
    x0, y0, x1, y1 = o.box
    cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0 - 1) / 2
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:                                               # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def ask(rng: random.Random, objects: list[SceneObject], width: int, qtype: str | None = None) -> tuple | None:
    """(qtype, question, answer, target object) for these objects, or None when `qtype` cannot be asked."""
    qtype = qtype or rng.choices(QUESTION_TYPES, QUESTION_WEIGHTS)[0]
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objects if o.colour == c] for c in COLOURS}
    if qtype == "colour":
        unique = [o for o in objects if len(by_shape[o.shape]) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return qtype, f"What colour is the {o.shape}?", o.colour, o
    if qtype == "shape":
        unique = [o for o in objects if len(by_colour[o.colour]) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return qtype, f"What shape is the {o.colour} object?", o.shape, o
    if qtype == "describe":
        ordered = sorted(objects, key=lambda o: (o.centre[0], o.centre[1]))
        return qtype, "Describe the scene.", ", ".join(f"{o.size} {o.colour} {o.shape}" for o in ordered), None
    if qtype == "count":
        s = rng.choice(SHAPES)
        return qtype, f"How many {s}s are there?", str(len(by_shape[s])), None
    named = [o for o in objects if sum(p.shape == o.shape and p.colour == o.colour for p in objects) == 1]
    if qtype == "size":
        if not named:
            return None
        o = rng.choice(named)
        return qtype, f"Is the {o.colour} {o.shape} big or small?", o.size, o
    if qtype == "position":
        far = [o for o in named if abs(o.centre[0] - width / 2) >= 8]
        if not far:
            return None
        o = rng.choice(far)
        return qtype, f"Is the {o.colour} {o.shape} on the left or the right?", \
            "left" if o.centre[0] < width / 2 else "right", o
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def example(seed: int | str, index: int, qtype: str | None = None, max_objects: int | None = None) -> Example:
    """Example `index` of the stream `seed` (deterministic). With `qtype`, redraw until it can be asked."""
    rng = random.Random(f"scene:{seed}:{index}")
    for _ in range(100):
        img, objects = draw_scene(rng, max_objects=max_objects)
        qa = ask(rng, objects, img.width, qtype)
        if qa is not None:
            t, q, a, o = qa
            return Example(img, objects, t, q, a, o)
    raise RuntimeError(f"could not draw a scene for question type {qtype!r} in 100 tries")


def prompt_text(question: str) -> str:
    """The prompt: the question, the `<|image|>` placeholder, and the answer cue. The question comes
    first so that, under causal attention, every image token can already see what is asked."""
    return f"Question: {question}\n<|image|>\nAnswer:"


def all_texts() -> list[str]:
    """Every word the questions and answers use (the BPE tokenizer is trained on these)."""
    words = [*SHAPES, *COLOURS, *SIZES, "left", "right", *map(str, range(10))]
    out = [f"Question: What colour is the {s}?\nAnswer: {c}" for s in SHAPES for c in COLOURS]
    out += [f"Question: What shape is the {c} object?\nAnswer: {s}" for s in SHAPES for c in COLOURS]
    out += [f"Question: How many {s}s are there?\nAnswer: {n}" for s in SHAPES for n in range(6)]
    out += [f"Question: Is the {c} {s} big or small?\nAnswer: {z}" for s in SHAPES for c in COLOURS for z in SIZES]
    out += [f"Question: Is the {c} {s} on the left or the right?\nAnswer: {p}"
            for s in SHAPES for c in COLOURS for p in ("left", "right")]
    out += [f"Question: Describe the scene.\nAnswer: {z} {c} {s}, {z} {c} {s}" for s in SHAPES for c in COLOURS
            for z in SIZES]
    return out + [" " + w for w in words]


def box_hit(token_box, object_box) -> bool:
    """The pointing-game test: the centre of a token's pixel box lies inside the object's box."""
    if any(math.isnan(v) for v in token_box):
        return False
    cx, cy = (token_box[0] + token_box[2]) / 2, (token_box[1] + token_box[3]) / 2
    return object_box[0] <= cx < object_box[2] and object_box[1] <= cy < object_box[3]
