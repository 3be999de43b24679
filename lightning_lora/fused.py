"""One autograd function for LoRA on a frozen dense layer: ``x Wᵀ + b + s · (x' Aᵀ) Bᵀ``.

Written as separate modules (base layer, A, B, ``* s``, ``+``), the LoRA branch costs
more than its tiny matmuls: the ``(tokens, out)`` update is materialised, scaled and added
in three passes, scaled once more in the backward, and the input gradients of the base
and LoRA branches are summed in yet another pass. Here the scaled update is accumulated
into the base output by one ``addmm_`` (``alpha=s``), and the LoRA input gradient into the
base input gradient by another, which halves the branch's cost on CPU (measured in
``benchmarks/train_cost.py``). Only the LoRA input ``x'`` and the ``(tokens, r)`` product
``x' Aᵀ`` are saved: the frozen base weight needs no saved input.

:class:`~lightning_lora.layers.LoRALinear` uses it only where it computes exactly what the
module path would (see :func:`fusable`); everything else takes the module path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

_PLAIN_TENSORS = (Tensor, nn.Parameter)


class _LoRADense(torch.autograd.Function):
    """Forward and backward of ``x Wt + bias + scaling · (x_lora Aᵀ) Bᵀ`` with a frozen ``Wt``."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, x_lora: Optional[Tensor], wt: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
        scaling: float,
    ) -> Tensor:  # fmt: skip
        # x (..., in); x_lora is x after dropout, None when it is x itself; wt (in, out); a (r, in); b (out, r)
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
        out = torch.addmm(bias, x2, wt) if bias is not None else x2 @ wt  # (tokens, out)
        after_a = xl2 @ a.t()  # (tokens, r)
        out.addmm_(after_a, b.t(), alpha=scaling)
        ctx.save_for_backward(xl2, wt, a, b, after_a)
        ctx.scaling, ctx.x_shape, ctx.separate_lora_input = scaling, x.shape, x_lora is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        xl2, wt, a, b, after_a = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        g_after_a = g2 @ b  # (tokens, r), not yet scaled
        need_x, need_xl, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_xl = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(g2.t(), after_a).mul_(s)
        if need_a:
            grad_a = torch.mm(g_after_a.t(), xl2).mul_(s)
        if need_x:
            grad_x = g2 @ wt.t()
            if not ctx.separate_lora_input:
                grad_x.addmm_(g_after_a, a, alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_xl:
            grad_xl = torch.mm(g_after_a, a).mul_(s).view(ctx.x_shape)
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_xl, None, grad_bias, grad_a, grad_b, None


def _no_hooks(*modules: nn.Module) -> bool:
    global_hooks = nn.modules.module
    if global_hooks._global_forward_hooks or global_hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def fusable(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, *modules: nn.Module) -> bool:
    """Whether :func:`lora_dense` computes exactly what the module path would.

    True for plain tensors of one floating dtype, a base weight that does not train, no
    autocast and no forward hooks on ``modules`` (hooks, e.g. DeepSpeed ZeRO-3's parameter
    gathering, expect those modules to be called).
    """
    dtype = x.dtype
    return (
        not weight.requires_grad
        and type(weight) in _PLAIN_TENSORS
        and type(a) in _PLAIN_TENSORS
        and type(b) in _PLAIN_TENSORS
        and type(x) is Tensor
        and weight.dtype == dtype
        and a.dtype == dtype
        and b.dtype == dtype
        and (bias is None or (type(bias) in _PLAIN_TENSORS and bias.dtype == dtype))
        and dtype.is_floating_point
        and not torch.is_autocast_enabled(x.device.type)
        and _no_hooks(*modules)
    )


def lora_dense(
    x: Tensor, x_lora: Optional[Tensor], wt: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """``x wt + bias + scaling · (x_lora aᵀ) bᵀ`` in one autograd node.

    Args:
        x: The layer input ``(..., in)``.
        x_lora: The adapter's input when it differs from ``x`` (after dropout), else None.
        wt: The frozen base weight as ``(in, out)`` (``nn.Linear.weight.t()``, ``Conv1D.weight``).
        bias: The base bias ``(out,)`` or None; it may train.
        a, b: ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``.
        scaling: ``s = alpha / r`` (or ``alpha / sqrt(r)``).
    """
    return _LoRADense.apply(x, x_lora, wt, bias, a, b, scaling)
