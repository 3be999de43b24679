"""Ready-made LightningDataModules for LoRA fine-tuning."""

from lightning_lora.data.glue import GLUE_TASKS, GLUEDataModule, GLUETask, glue_task, read_glue_tsv
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.data.prompts import PromptFormatter

__all__ = [
    "GLUE_TASKS",
    "GLUEDataModule",
    "GLUETask",
    "InstructionDataModule",
    "PromptFormatter",
    "glue_task",
    "read_glue_tsv",
]
