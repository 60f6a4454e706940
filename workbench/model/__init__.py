"""The Llama 4 model in plain PyTorch (one concept per file)."""

from workbench.model.kv_cache import KVCache
from workbench.model.moe import MoEIntervention
from workbench.model.transformer import Llama4ForCausalLM, Llama4TextModel, ModelOutput

__all__ = ["KVCache", "Llama4ForCausalLM", "Llama4TextModel", "ModelOutput", "MoEIntervention"]
