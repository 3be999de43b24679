"""``SequenceClassificationModule``: a transformers sequence classifier (or regressor) with GLUE metrics.

Logged names (``<stage>`` is ``val`` in fit/validate and ``test`` in test; MNLI logs
``<stage>_matched/...`` and ``<stage>_mismatched/...`` for its two dev sets):

=================  ==========================================================
``train/loss``     training loss, every step
``<stage>/loss``   mean loss over the dev set
accuracy           ``<stage>/accuracy``: share of correct classes (all classification tasks)
F1                 ``<stage>/f1``: F1 of the positive class (MRPC, QQP)
Matthews corr.     ``<stage>/matthews_corrcoef`` (CoLA)
Pearson, Spearman  ``<stage>/pearson``, ``<stage>/spearman`` (STS-B)
=================  ==========================================================
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lightning_lora.data.glue import GLUETask, glue_task
from lightning_lora.sources import resolve_model_source
from lightning_lora.optim import build_optimizer


def task_metrics(names: tuple[str, ...], num_labels: int) -> dict[str, Metric]:
    """Fresh torchmetrics objects for the metric ``names`` of a task (see the module docstring)."""
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=num_labels, average="micro"),
        "f1": BinaryF1Score,
        "matthews_corrcoef": lambda: MatthewsCorrCoef(task="multiclass", num_classes=num_labels),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return {name: factories[name]() for name in names}


class SequenceClassificationModule(pl.LightningModule):
    """``AutoModelForSequenceClassification`` trained with its own loss (cross-entropy, or MSE for regression).

    Give ``task_name`` for a GLUE task (number of labels, label names, metrics and MNLI's two dev
    sets follow from it), or ``num_labels`` for other data (batches with ``input_ids``,
    ``attention_mask``, ``labels``; accuracy is logged; ``num_labels=1`` is regression with
    Pearson/Spearman). The default optimizer is AdamW over the trainable parameters with a linear
    warm-up and linear decay to 0, stepped every step (the LoRA paper's GLUE recipe);
    ``--optimizer``/``--lr_scheduler`` on the command line replace it.

    Args:
        model_name_or_path: Hub name, local folder, or ``pkg:<module>`` (a model shipped in a Python package).
        task_name: A GLUE task (``sst2``, ``mnli``, ...).
        num_labels: Number of classes when ``task_name`` is not given.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay (biases and norm weights get none).
        warmup_ratio: Share of all training steps spent warming the learning rate up from 0.
    """

    def __init__(
        self,
        model_name_or_path: str,
        task_name: Optional[str] = None,
        num_labels: Optional[int] = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.task: Optional[GLUETask] = glue_task(task_name) if task_name is not None else None
        if self.task is None and num_labels is None:
            raise ValueError("Give `task_name` (a GLUE task) or `num_labels` (1 for regression).")
        if self.task is not None and num_labels not in (None, self.task.num_labels):
            raise ValueError(
                f"num_labels={num_labels} contradicts task {self.task.name}, which has {self.task.num_labels}; "
                "leave num_labels unset."
            )
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.save_hyperparameters()
        self.num_labels = self.task.num_labels if self.task is not None else int(num_labels or 0)
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}.")
        labels = self.task.labels if self.task is not None else ()
        extra: dict[str, Any] = {"problem_type": "regression" if self.num_labels == 1 else "single_label_classification"}
        if labels:
            extra.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_source(model_name_or_path), num_labels=self.num_labels, ignore_mismatched_sizes=True, **extra
        ).train()  # from_pretrained returns eval mode
        if self.task is not None:
            names, self.eval_suffixes = self.task.metrics, [suffix for suffix, _ in self.task.eval_files]
        else:
            names, self.eval_suffixes = (("pearson", "spearman") if self.num_labels == 1 else ("accuracy",)), [""]
        self.metrics = nn.ModuleDict(
            {
                f"{stage}{suffix}": MetricCollection(task_metrics(names, self.num_labels), prefix=f"{stage}{suffix}/")
                for stage in ("val", "test")
                for suffix in self.eval_suffixes
            }
        )
        self._predictions: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k != "idx"})

    def _predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.num_labels == 1 else logits.argmax(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor], dataloader_idx: int) -> None:
        if dataloader_idx >= len(self.eval_suffixes):
            raise ValueError(
                f"{stage} dataloader {dataloader_idx} has no metrics: this module expects {len(self.eval_suffixes)} "
                f"{stage} set(s){f' for task {self.task.name}' if self.task else ''}. Do model and data name the same task?"
            )
        key = f"{stage}{self.eval_suffixes[dataloader_idx]}"
        out = self(**batch)
        metrics = self.metrics[key]
        metrics.update(self._predict(out.logits), batch["labels"])
        size = len(batch["input_ids"])
        self.log(f"{key}/loss", out.loss, batch_size=size, add_dataloader_idx=False)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=size, add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    # -- predict: GLUE submission files ----------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted class ids (or scores); kept with the rows' ``idx`` for :meth:`on_predict_epoch_end`."""
        batch = {k: v for k, v in batch.items() if k != "labels"}
        prediction = self._predict(self(**batch).logits)
        while len(self._predictions) <= dataloader_idx:
            self._predictions.append([])
        self._predictions[dataloader_idx].append((batch["idx"].cpu(), prediction.detach().cpu()))
        return prediction

    def on_predict_epoch_end(self) -> None:
        """Hand the predictions to the datamodule's ``write_predictions`` (GLUE submission files), if it has one."""
        datamodule = getattr(self.trainer, "datamodule", None)
        writer = getattr(datamodule, "write_predictions", None)
        if callable(writer):
            writer([(torch.cat([i for i, _ in parts]), torch.cat([p for _, p in parts])) for parts in self._predictions])

    # -- optimizer ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW over the parameters trainable now (the adapters and ``modules_to_save`` under LoRA),
        linear warm-up over ``warmup_ratio`` of all steps, then linear decay to 0."""
        from transformers import get_linear_schedule_with_warmup

        hp = self.hparams
        optimizer = build_optimizer(self, partial(torch.optim.AdamW, lr=hp.learning_rate, weight_decay=hp.weight_decay))
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
