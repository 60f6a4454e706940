"""Shared fixtures: tiny random HF models and our model on identical weights (fp32, CPU); a test
image; the app served on a free local port."""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.config import Llama4TextConfig, preset
from workbench.model import Llama4ForCausalLM

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread by default: the tiny models are too small to gain from more, and on a shared
# 2-core machine spinning worker threads cost 5–10× in wall time (measured). Override with
# WORKBENCH_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("WORKBENCH_TEST_THREADS", "1")))
DATA = Path(os.environ.get("WORKBENCH_DATA", REPO.parent / "shared" / "data"))


def require_data(sub: str, what: str) -> Path:
    """`DATA/sub`, the data a known-case test needs (README, "Tests that need the shared data").

    The texts and OLMoE's routing counts live outside the repo, so a fresh clone has none: the test
    skips with a one-line reason naming the path and how to supply it. CI sets
    WORKBENCH_REQUIRE_DATA=1, which turns a missing directory into a failure, so the oracle tests can
    never silently stop running there."""
    path = DATA / sub
    if path.is_dir():
        return path
    msg = (f"{what} not found at {path}: set WORKBENCH_DATA to the directory holding {sub}/ "
           "(the project's shared data, see README)")
    if os.environ.get("WORKBENCH_REQUIRE_DATA") == "1":
        pytest.fail(f"WORKBENCH_REQUIRE_DATA=1 and {msg}")
    pytest.skip(msg)


def hf_config(cfg: Llama4TextConfig, attn: str = "eager"):
    from transformers import Llama4TextConfig as HFConfig

    d = cfg.hf_kwargs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hc = HFConfig(**d)
    hc._attn_implementation = attn
    return hc


def random_hf_model(cfg: Llama4TextConfig, seed: int = 0, std: float = 0.08, attn: str = "eager"):
    """A transformers Llama4ForCausalLM with random weights large enough to make attention sharp."""
    from transformers import Llama4ForCausalLM as HFModel

    torch.manual_seed(seed)
    hf = HFModel(hf_config(cfg, attn)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return hf


def ours_from_hf(cfg: Llama4TextConfig, hf) -> Llama4ForCausalLM:
    model = Llama4ForCausalLM(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


@pytest.fixture
def tiny_cfg() -> Llama4TextConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`), whatever
    WORKBENCH_TEST_THREADS says: tiny tensors on a shared 2-core box made a forward ~80x slower with 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_image():
    """A 100×80 random RGB image: on tiny-vision a 2×2 canvas of 56-px tiles + a global tile = 20 image
    tokens (the bottom-right cells are padding)."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(model, runs, model_source: str):
    """The workbench app on `model` over `runs`, served on 127.0.0.1 at a free port, without share:
    yields (demo, url, port) and closes the server afterwards."""
    from apps.workbench_app import build_app, serve

    demo = build_app(model, runs, model_source=model_source)
    port = free_port()
    _, url, _ = serve(demo, "127.0.0.1", port, share=False, block=False)
    yield demo, url, port
    demo.close()
