"""Llama 4 Workbench: an instrumented Llama 4 in plain PyTorch.

    import workbench
    model = workbench.load_model("tiny")                  # or a HF checkpoint directory
    ids = workbench.generate(model, "Hello", max_new_tokens=8)
    workbench.record(model, ["some text"], "run.zarr")    # router + entropy into a Zarr store

Heavy imports are lazy so `import workbench` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "workbench.checkpoint", "save_model": "workbench.checkpoint",
    "build_model": "workbench.checkpoint", "generate": "workbench.generation",
    "Llama4TextConfig": "workbench.config", "PRESETS": "workbench.config", "preset": "workbench.config",
    "Llama4ForCausalLM": "workbench.model", "KVCache": "workbench.model", "MoEIntervention": "workbench.model",
    "record": "workbench.recording", "open_run": "workbench.store",
    "hooks": "workbench.instrument.hooks", "run_with_cache": "workbench.instrument.hooks",
    "load_multimodal": "workbench.checkpoint_vision", "save_multimodal": "workbench.checkpoint_vision",
    "prepare": "workbench.image", "Llama4ForConditionalGeneration": "workbench.model.multimodal",
    "VISION_PRESETS": "workbench.config_vision", "vision_preset": "workbench.config_vision",
    "render_chat": "workbench.chat", "chat_generate": "workbench.chat",
    "generate_recorded": "workbench.live", "chat_recorded": "workbench.live", "append_generation": "workbench.live",
    "load_expert_parallel": "workbench.expert_parallel",
    "quantize_model": "workbench.quant", "load_quantized": "workbench.quant", "load_fp8": "workbench.quant",
}


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        return mod if name == "hooks" else getattr(mod, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
