"""Watch ΔW while it trains: per-module ‖ΔW‖_F and effective rank, logged every N steps.

The numbers come from :func:`~lightning_lora.analysis.lowrank_singular_values`, which reads the
small factors only (an ``r × r`` core from thin QRs of B and Aᵀ), so ΔW (``d_out × d_in``) is
never formed and the cost is ``O((d_in + d_out) r²)`` per module: small next to a training step
(``benchmarks/monitor_cost.py`` measures it). Use :class:`LoRAMonitor` as its own callback, or
``LoRACallback(log_delta_every_n_steps=N)``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_lora.analysis import effective_rank, layer_factors, lowrank_singular_values
from lightning_lora.inject import lora_layers
from lightning_lora.mha import LoRAMultiheadAttention

#: Prefix of the logged metric names: ``lora_delta/<module>/fro`` and ``lora_delta/<module>/eff_rank90``.
METRIC_PREFIX = "lora_delta"


def delta_metrics(model: nn.Module, energy: float = 0.90) -> dict[str, float]:
    """``{lora_delta/<module>/fro: ‖ΔW‖_F, lora_delta/<module>/eff_rank<pct>: k}`` for every LoRA layer.

    The effective rank is the smallest k whose top-k singular values hold ``energy`` of Σσ².
    """
    metrics: dict[str, float] = {}
    tag = f"eff_rank{round(energy * 100)}"
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRAMultiheadAttention) and not layer.in_projections:
            continue  # only out_proj is adapted; it is its own LoRA layer
        factors = layer_factors(name, layer)
        sigma = lowrank_singular_values(factors.lora_A, factors.lora_B, factors.scaling)
        metrics[f"{METRIC_PREFIX}/{name}/fro"] = float(sigma.square().sum().sqrt())
        metrics[f"{METRIC_PREFIX}/{name}/{tag}"] = float(effective_rank(sigma, energy))
    return metrics


class LoRAMonitor(Callback):
    """Log per-module ‖ΔW‖_F and effective rank to the Trainer's loggers every ``every_n_steps`` optimizer steps.

    Example::

        trainer = L.Trainer(callbacks=[LoRACallback(r=8), LoRAMonitor(every_n_steps=50)], logger=CSVLogger("logs"))

    Args:
        every_n_steps: Log after each optimizer step whose ``global_step`` is a multiple of this
            (step 0 is skipped: ΔW = 0 there).
        energy: Share of Σσ² the logged effective rank holds.

    Attributes:
        seconds: Wall time spent computing the metrics, per logged step (for cost checks).
    """

    def __init__(self, every_n_steps: int, energy: float = 0.90) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}.")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"`energy` must be in (0, 1], got {energy}.")
        self.every_n_steps = every_n_steps
        self.energy = energy
        self.seconds: list[float] = []
        self._last_step = -1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the batch's optimizer step (if any): log when a new multiple of ``every_n_steps`` is reached."""
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not trainer.loggers:
            return
        self._last_step = step
        if not trainer.is_global_zero or not lora_layers(pl_module):
            return
        start = time.perf_counter()
        metrics = delta_metrics(pl_module, self.energy)
        self.seconds.append(time.perf_counter() - start)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


__all__ = ["METRIC_PREFIX", "LoRAMonitor", "delta_metrics"]
