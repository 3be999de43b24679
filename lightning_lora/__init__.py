"""lightning-lora: LoRA (Hu et al. 2021) for PyTorch Lightning, as one callback.

Public API::

    LoRACallback                       # the Lightning integration
    LoRAConfig                         # validated hyper-parameters
    inject_lora, merge_lora, unmerge_lora, unload_lora   # plain nn.Module functions
    adapter_state_dict, check_adapter_state, find_lora_targets
    plan_lora, summarize_lora, LoRASummary               # dry run and summary
    lora_param_groups, build_optimizer                   # optimizer groups (LoRA+)
"""

from lightning_lora.callback import LoRACallback
from lightning_lora.config import LoRAConfig
from lightning_lora.inject import (
    ModulesToSave,
    adapter_state_dict,
    adapter_state_keys,
    check_adapter_state,
    find_lora_targets,
    inject_lora,
    lora_layers,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.layers import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear
from lightning_lora.optim import build_optimizer, lora_param_groups
from lightning_lora.summary import LoRASummary, plan_lora, summarize_lora

__version__ = "0.1.0"

__all__ = [
    "LoRACallback",
    "LoRAConfig",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRASummary",
    "ModulesToSave",
    "adapter_state_dict",
    "adapter_state_keys",
    "build_optimizer",
    "check_adapter_state",
    "find_lora_targets",
    "inject_lora",
    "lora_layers",
    "lora_param_groups",
    "merge_lora",
    "plan_lora",
    "summarize_lora",
    "unload_lora",
    "unmerge_lora",
]
