"""lightning-lora: LoRA (Hu et al. 2021) for PyTorch Lightning, as one callback.

Public API::

    LoRACallback                       # the Lightning integration
    LoRAConfig                         # validated hyper-parameters
    inject_lora, merge_lora, unmerge_lora, unload_lora   # plain nn.Module functions
    adapter_state_dict, check_adapter_state, find_lora_targets
    plan_lora, summarize_lora, LoRASummary               # dry run and summary
    lora_param_groups, build_optimizer                   # optimizer groups (LoRA+)
    add_adapter, set_active_adapter, delete_adapter, active_adapter, list_adapters   # task switching
    get_adapter_state, set_adapter_state, get_adapter_config
    save_adapter, load_adapter, load_adapter_checkpoint, save_merged   # adapter files
    AtomicCheckpointIO, CheckpointError                  # atomic checkpoint writes, clear errors on damaged files
    base_fingerprint, check_base_fingerprint             # which base model an adapter was trained on
    find_dead_adapters, DeadAdapterError                 # adapters that get no gradient
"""

from lightning_lora.adapters import (
    active_adapter,
    add_adapter,
    delete_adapter,
    get_adapter_config,
    get_adapter_state,
    list_adapters,
    set_active_adapter,
    set_adapter_state,
)
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
from lightning_lora.checkpoint_io import AtomicCheckpointIO
from lightning_lora.errors import CheckpointError
from lightning_lora.fingerprint import base_fingerprint, check_base_fingerprint
from lightning_lora.io import load_adapter, load_adapter_checkpoint, save_adapter, save_merged
from lightning_lora.guard import DeadAdapterError, find_dead_adapters
from lightning_lora.layers import LoRAConv1d, LoRAConv1D, LoRAConv2d, LoRAConv3d, LoRAEmbedding, LoRALayer, LoRALinear
from lightning_lora.mha import LoRAMultiheadAttention
from lightning_lora.monitor import LoRAMonitor
from lightning_lora.optim import build_optimizer, lora_param_groups
from lightning_lora.quantize import dequantize_base, keep_training_format, quantize_base
from lightning_lora.summary import LoRASummary, plan_lora, summarize_lora

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "base_fingerprint",
    "check_base_fingerprint",
    "LoRACallback",
    "LoRAConfig",
    "DeadAdapterError",
    "LoRAConv1D",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAMonitor",
    "LoRAMultiheadAttention",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRASummary",
    "ModulesToSave",
    "active_adapter",
    "adapter_state_dict",
    "adapter_state_keys",
    "add_adapter",
    "build_optimizer",
    "check_adapter_state",
    "delete_adapter",
    "dequantize_base",
    "find_dead_adapters",
    "find_lora_targets",
    "get_adapter_config",
    "get_adapter_state",
    "inject_lora",
    "keep_training_format",
    "list_adapters",
    "load_adapter",
    "load_adapter_checkpoint",
    "lora_layers",
    "lora_param_groups",
    "merge_lora",
    "plan_lora",
    "quantize_base",
    "save_adapter",
    "save_merged",
    "set_active_adapter",
    "set_adapter_state",
    "summarize_lora",
    "unload_lora",
    "unmerge_lora",
]
