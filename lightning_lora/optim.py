"""Optimizer parameter groups for a LoRA model, and a check that nothing trainable is left out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

from torch import nn
from torch.optim import Optimizer

from lightning_lora.inject import ModulesToSave
from lightning_lora.layers import LoRALayer

OptimizerFactory = Callable[[Iterable[Any]], Optimizer]


def lora_param_groups(model: nn.Module, lora_b_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` split into named optimizer groups.

    Groups (empty ones are left out): ``lora_A``; ``lora_B``, whose learning rate is
    multiplied by ``lora_b_lr_ratio`` (LoRA+, Hayou et al. 2024, suggests 2–16; the
    factor is carried in the group as ``lr_ratio`` and applied by
    :func:`build_optimizer`); ``modules_to_save`` (matrices of fully trained modules);
    ``no_decay`` (biases and norm weights: every trainable tensor with fewer than two
    dimensions, weight decay 0); ``other`` (anything else left trainable). Frozen
    parameters are in no group, so they get no optimizer state.
    """
    if lora_b_lr_ratio <= 0:
        raise ValueError(f"`lora_b_lr_ratio` must be positive, got {lora_b_lr_ratio}. Use 1.0 to disable LoRA+.")
    role: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for name, param in module.adapter_parameters():
                role[id(param)] = "lora_B" if "_B" in name else "lora_A"
        elif isinstance(module, ModulesToSave):
            for param in module.modules_to_save.parameters():
                role.setdefault(id(param), "modules_to_save")
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("lora_A", "lora_B", "modules_to_save", "no_decay", "other")}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        name = role.get(id(param), "other")
        if name not in ("lora_A", "lora_B") and param.ndim < 2:
            name = "no_decay"
        groups[name].append(param)
    options: dict[str, dict[str, Any]] = {"lora_B": {"lr_ratio": lora_b_lr_ratio}, "no_decay": {"weight_decay": 0.0}}
    return [{"params": params, "name": name, **options.get(name, {})} for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, factory: OptimizerFactory, lora_b_lr_ratio: float = 1.0) -> Optimizer:
    """``factory(groups)`` with the groups of :func:`lora_param_groups`, LoRA+ ratio applied.

    ``factory`` is e.g. ``functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)``;
    its keyword arguments are the defaults of every group.
    """
    optimizer = factory(lora_param_groups(model, lora_b_lr_ratio))
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_ratio", 1.0)
    return optimizer


def check_optimizer_covers_trainable(model: nn.Module, optimizers: Iterable[Optimizer]) -> None:
    """Raise if a parameter that requires grad is in no optimizer's param groups.

    Such a parameter would get gradients but never change: a LoRA run that silently
    trains nothing.
    """
    covered = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(
            f"Trainable parameters are missing from every optimizer param group: {shown}. `configure_optimizers` "
            "probably collected parameters before LoRA was injected (e.g. in `__init__`) or filtered them by name. "
            "Build the optimizer from `self.parameters()` inside `configure_optimizers`, or let the callback build "
            "it: `LoRACallback(optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))`."
        )
