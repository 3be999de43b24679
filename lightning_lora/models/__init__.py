"""Ready-made LightningModules for LoRA fine-tuning, and pretrained-model loading."""

from lightning_lora.models.causal_lm import CausalLMModule
from lightning_lora.models.pretrained import SMOLLM2, load_causal_lm, load_tokenizer, resolve_pretrained

__all__ = ["SMOLLM2", "CausalLMModule", "load_causal_lm", "load_tokenizer", "resolve_pretrained"]
