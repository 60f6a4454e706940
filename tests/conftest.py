"""Shared fixtures: tiny random HF models and our model on identical weights (fp32, CPU)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

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


def hf_config(cfg: Llama4TextConfig, attn: str = "eager"):
    from transformers import Llama4TextConfig as HFConfig

    d = cfg.to_hf()
    for k in ("model_type", "rope_scaling", "rope_theta", "layer_types"):
        d.pop(k, None)
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
