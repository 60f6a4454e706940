"""The trained reference models shipped inside the package, loadable by name.

    workbench.load_model("tiny-moe")     text MoE trained on arXiv/C4/GitHub/Wikipedia + synthetic data
    workbench.load_model("tiny-vlm")     vision-language model trained on synthetic scenes
    workbench.load_model("tiny-irope")   Llama 4 iRoPE trained on associative recall (task.json beside it)

Each is an ordinary Hugging Face checkpoint directory under `workbench/models/<name>/` (config.json,
model.safetensors, tokenizer.json, a model card TRAINING.md, eval.json, the loss curve), so
`transformers` loads it too. Unlike the random-weight presets (`tiny`, `tiny-vision`, …) these are
real weights: routing and attributions on them mean something. `docs/models.md` has their cards.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED = ("tiny-moe", "tiny-vlm", "tiny-irope")


def bundled_path(name: str) -> Path:
    """The checkpoint directory of a bundled model; a clear error if the name or the files are missing."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled model {name!r}; bundled: {list(BUNDLED)}")
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled model {name!r} is missing from {path} (no config.json): reinstall the "
                                "package, or retrain it with `workbench train` (see docs/models.md)")
    return path


def resolve_source(source):
    """A bundled model's name → its directory; anything else unchanged (a local directory named like a
    bundled model wins, as a path the user typed should)."""
    if isinstance(source, str) and source in BUNDLED and not os.path.isdir(source):
        return bundled_path(source)
    return source


def is_bundled(source) -> bool:
    return isinstance(source, str) and source in BUNDLED
