"""Dead-adapter guard: find LoRA layers that cannot train because no gradient reaches them.

An adapter is *dead* when its forward is never called (a parent module reads
``child.weight`` directly, as ``nn.MultiheadAttention`` does with ``out_proj``; or the
module is not used by this model's forward) or its output never reaches the loss (it is
detached or discarded). Its parameters then get no gradient, the optimizer skips them,
and the run trains nothing there without any error (PEFT 0.21.2 wraps
``MultiheadAttention.out_proj`` exactly like that).

What counts as "no gradient" after a backward pass, per LoRA layer:

* any trainable adapter tensor whose ``.grad`` is ``None`` — autograd never reached it; or
* every trainable adapter tensor of the layer has an all-zero gradient.

A single zero gradient is *not* a sign of a dead adapter: with the usual initialisation
(B = 0 for dense layers, A = 0 for embeddings) the gradient of the other factor is exactly
zero at the first step (``∂L/∂A = s·Bᵀ·…`` = 0), so only the layer as a whole is judged.
Once B ≠ 0 both factors get gradients, so checking the first optimizer step is enough.

:class:`~lightning_lora.LoRACallback` runs the check once per ``fit``, right before the
first optimizer step (after all gradient-accumulation micro-batches), with
``dead_adapter_check="error"`` (default), ``"warn"`` or ``"off"``; the dry run can do it
with one forward/backward on a sample batch (:func:`probe_dead_adapters`). The cost is one
pass over the adapter gradients (``Tensor.any`` per tensor), once per fit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_lora.inject import lora_layers

log = logging.getLogger(__name__)

#: What to do when adapters get no gradient: raise, warn, or skip the check.
DeadAdapterCheck = Literal["error", "warn", "off"]
DEAD_ADAPTER_CHECKS = ("error", "warn", "off")

_NOT_CALLED = "its forward was never called"
_NOT_IN_LOSS = "its forward ran, but its output does not reach the loss"
_NO_GRAD = "received no gradient"


class DeadAdapterError(RuntimeError):
    """Some LoRA adapters got no gradient: they would never train."""


class ForwardCallRecorder:
    """Records which LoRA layers of ``model`` run their forward, to tell the two causes apart.

    Use as a context manager around the forward passes to watch (forward hooks are added on
    enter and removed on exit), or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.called: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def start(self) -> None:
        """Attach one forward hook per LoRA layer."""
        self.stop()
        for name, layer in lora_layers(self.model).items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))

    def stop(self) -> None:
        """Remove the hooks; what was recorded stays in :attr:`called`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._handles)

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.called.add(name)

        return record

    def __enter__(self) -> "ForwardCallRecorder":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def find_dead_adapters(model: nn.Module, called: Optional[set[str]] = None) -> dict[str, str]:
    """LoRA layers of ``model`` whose adapters got no gradient in the last backward, with the likely cause.

    Call after ``loss.backward()`` and before the gradients are zeroed. Layers whose
    adapter tensors are all frozen (``requires_grad=False``) are not judged.

    Args:
        called: Names of the LoRA layers whose forward ran (see :class:`ForwardCallRecorder`);
            with it the cause is told apart, without it both are named.

    Returns:
        Qualified layer name → why its adapter is dead; empty when all are alive.
    """
    dead: dict[str, str] = {}
    for name, layer in lora_layers(model).items():
        params = [p for _, p in layer.adapter_parameters() if p.requires_grad]
        if not params:
            continue  # e.g. an attention wrapper adapting only out_proj: its inner LoRALinear is judged
        grads = [p.grad for p in params]
        if all(g is not None for g in grads) and any(bool(g.any()) for g in grads):
            continue
        if called is None:
            dead[name] = _NO_GRAD
        else:
            dead[name] = _NOT_IN_LOSS if name in called else _NOT_CALLED
    return dead


def layer_types(model: nn.Module) -> dict[str, str]:
    """Qualified name → type of the wrapped module, for every LoRA layer of ``model``."""
    return {name: type(layer.base_layer).__name__ for name, layer in lora_layers(model).items()}


def dead_adapter_message(dead: Mapping[str, str], types: Mapping[str, str], when: str) -> str:
    """The error text for ``dead``: each module, its type, the likely cause and the ways out.

    Args:
        types: Every LoRA layer's name → the wrapped module's type (:func:`layer_types`).
    """
    lines = []
    for name, cause in dead.items():
        kind = f"LoRA on {types[name]}" if name in types else "LoRA layer"
        if cause == _NOT_CALLED:
            hint = f"a parent module reads `{name}.weight` directly, or the model's forward does not use `{name}`"
        elif cause == _NOT_IN_LOSS:
            hint = "its output is detached or discarded before the loss"
        else:
            hint = f"a parent reads `{name}.weight` directly, or `{name}` is not used by the model's forward"
        lines.append(f"  - `{name}` ({kind}): {cause} — likely cause: {hint}")
    names = list(dead)
    return (
        f"LoRA adapters received no gradient {when}, so they would never train ({len(dead)} of {len(types)} "
        "LoRA layers):\n"
        + "\n".join(lines)
        + "\nTarget modules whose forward the model calls (for nn.MultiheadAttention target the attention module, "
        f"e.g. `self_attn`, not its out_proj), or leave these out with exclude_modules={names!r}. To train anyway, "
        'pass LoRACallback(dead_adapter_check="warn") or "off".'
    )


def report_dead_adapters(
    dead: Mapping[str, str], types: Mapping[str, str], mode: DeadAdapterCheck, when: str
) -> None:
    """Raise :class:`DeadAdapterError` (``"error"``) or log a warning (``"warn"``) when ``dead`` is not empty."""
    if not dead or mode == "off":
        return
    message = dead_adapter_message(dead, types, when)
    if mode == "error":
        raise DeadAdapterError(message)
    log.warning(message)


def check_loss_reaches_adapters(
    model: nn.Module, loss: Any, mode: DeadAdapterCheck, when: str, called: Optional[set[str]] = None
) -> None:
    """Before ``loss.backward()``: a loss that requires no grad means every adapter is dead.

    Caught here, torch's own error ("element 0 of tensors does not require grad") would say
    nothing about which modules are at fault.
    """
    if mode == "off" or not isinstance(loss, Tensor) or loss.requires_grad:
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return
    dead = {
        name: _NO_GRAD if called is None else _NOT_IN_LOSS if name in called else _NOT_CALLED
        for name, layer in lora_layers(model).items()
        if any(True for _ in layer.adapter_parameters())
    }
    report_dead_adapters(dead, layer_types(model), mode, when + " (the loss does not depend on any trainable parameter)")


def probe_dead_adapters(model: nn.Module, batch: Any) -> dict[str, str]:
    """One forward and backward on ``batch`` (no optimizer step): which adapters would get no gradient.

    The loss is ``model.training_step(batch, 0)`` for a LightningModule (its ``"loss"``
    entry if it returns a dict), else the sum of ``model(*batch)`` (``model(batch)`` for a
    single tensor or dict). The model runs in train mode; its modes are restored and the
    gradients it created cleared afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    no_grad_before = [p for p in model.parameters() if p.grad is None]
    model.train()
    recorder = ForwardCallRecorder(model)
    try:
        with recorder:
            loss = _loss_of(model, batch)
        if loss.requires_grad:
            loss.backward()
        return find_dead_adapters(model, recorder.called)
    finally:
        for module, training in modes.items():
            module.training = training
        for param in no_grad_before:
            param.grad = None


def _loss_of(model: nn.Module, batch: Any) -> Tensor:
    training_step = getattr(model, "training_step", None)
    if callable(training_step):
        out = training_step(batch, 0)
        out = out["loss"] if isinstance(out, Mapping) else out
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    items = out if isinstance(out, (tuple, list)) else [out]
    tensors = [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]
    if not tensors:
        raise TypeError(
            f"The sample batch gave {type(out).__name__}, not a loss tensor: the dead-adapter probe needs "
            "`training_step` to return a loss (or a dict with 'loss'), or the model to return tensors."
        )
    return torch.stack([t.float().sum() for t in tensors]).sum()
