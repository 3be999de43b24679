"""What LoRA adapts in a model and how many parameters train: before a run and during it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.guard import probe_dead_adapters
from lightning_lora.inject import ModulesToSave, inject_lora, lora_layers, unload_lora
from lightning_lora.mha import LoRAMultiheadAttention

_SHOWN = 6


@dataclass(frozen=True)
class LoRASummary:
    """Adapted modules and parameter counts of a LoRA model.

    Attributes:
        adapted: Qualified name → type name of the base module, for each LoRA layer.
        modules_to_save: Qualified names of modules trained in full.
        adapter_params: Parameters in the adapters' A and B matrices.
        trainable_params: Parameters that receive gradients (adapters, trained copies of
            ``modules_to_save``, trainable biases, anything else left unfrozen).
        total_params: All parameters, adapters and copies included.
        attention: Qualified name → adapted projections (``"q"``, ``"k"``, ``"v"``,
            ``"out"``) of each ``nn.MultiheadAttention`` (its ``out_proj`` adapter is
            counted here, not as a separate entry of ``adapted``).
        dead_adapters: Qualified name → why its adapter got no gradient, from a dry run
            with a sample batch (empty otherwise).
    """

    adapted: dict[str, str]
    modules_to_save: list[str]
    adapter_params: int
    trainable_params: int
    total_params: int
    attention: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dead_adapters: dict[str, str] = field(default_factory=dict)
    by_type: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_type", dict(Counter(self.adapted.values())))

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.by_type.items()))
        lines = [
            f"LoRA adapts {len(self.adapted)} modules ({types})",
            f"  trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_percent:.4f}%), of which adapters: {self.adapter_params:,}",
        ]
        if self.attention:
            picks = sorted(set(self.attention.values()))
            names = list(self.attention)
            shown = ", ".join(names[:_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")
            lines.append(
                f"  attention (nn.MultiheadAttention, projections {' | '.join(','.join(p) for p in picks)}): {shown}"
            )
        if self.modules_to_save:
            lines.append(f"  trained in full (modules_to_save): {', '.join(self.modules_to_save)}")
        if self.dead_adapters:
            lines.append(f"  DEAD (no gradient on the sample batch): {', '.join(self.dead_adapters)}")
        return "\n".join(lines)


def summarize_lora(model: nn.Module) -> LoRASummary:
    """Summarize a model that already holds LoRA layers."""
    layers = lora_layers(model)
    inner = tuple(f"{name}." for name, layer in layers.items() if isinstance(layer, LoRAMultiheadAttention))
    return LoRASummary(
        adapted={name: type(layer.base_layer).__name__ for name, layer in layers.items() if not name.startswith(inner)},
        modules_to_save=[name for name, m in model.named_modules() if isinstance(m, ModulesToSave)],
        adapter_params=sum(p.numel() for layer in layers.values() for _, p in layer.adapter_parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        attention={n: layer.projections for n, layer in layers.items() if isinstance(layer, LoRAMultiheadAttention)},
    )


def plan_lora(model: nn.Module, config: LoRAConfig, sample_batch: Any = None) -> LoRASummary:
    """Dry run: the summary :func:`inject_lora` would produce, leaving ``model`` unchanged.

    Injects, summarizes and unloads again; the model's modules, weights, ``requires_grad``
    flags and the global RNG state are as before. Use it to check targets before a
    long run. With ``sample_batch``, one forward/backward on it (no optimizer step, see
    :func:`~lightning_lora.guard.probe_dead_adapters`) fills ``dead_adapters``; state the
    forward itself keeps (caches, a LightningModule's attributes) is not rolled back.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        inject_lora(model, config)
        try:
            summary = summarize_lora(model)
            if sample_batch is None:
                return summary
            dead = probe_dead_adapters(model, sample_batch)
            return dataclasses.replace(summary, dead_adapters=dead)
        finally:
            unload_lora(model)
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
