"""Ready-made LightningDataModules for LoRA fine-tuning."""

from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.data.prompts import PromptFormatter

__all__ = ["InstructionDataModule", "PromptFormatter"]
