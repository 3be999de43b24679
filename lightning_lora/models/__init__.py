"""Ready-made LightningModules for LoRA fine-tuning, and pretrained-model loading."""

from lightning_lora.models.causal_lm import CausalLMModule
from lightning_lora.models.classification import SequenceClassificationModule, task_metrics
from lightning_lora.models.pretrained import SMOLLM2, load_causal_lm, load_tokenizer, resolve_pretrained

__all__ = [
    "SMOLLM2",
    "CausalLMModule",
    "SequenceClassificationModule",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_pretrained",
    "task_metrics",
]
