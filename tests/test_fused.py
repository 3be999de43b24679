"""The fused LoRA dense path (lightning_lora.fused) equals the module path, value and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora import LoRAConv1D, LoRALayer, LoRALinear
from lightning_lora.fused import fusable


def make(kind: str, dropout: float = 0.0, bias: bool = True, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    if kind == "linear":
        layer = LoRALinear(nn.Linear(12, 10, bias=bias), r=4, alpha=8, dropout=dropout)
    else:
        layer = LoRAConv1D(Conv1D(10, 12), r=4, alpha=8, dropout=dropout)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # non-zero B: the update and every gradient are non-zero
    return layer


def run(layer: LoRALinear, x: torch.Tensor, module_path: bool, seed: int = 0) -> list[torch.Tensor]:
    """Output and the gradients of x, A, B (and a training bias) for one forward/backward."""
    for p in [x, *layer.parameters()]:
        p.grad = None
    torch.manual_seed(seed)  # the same dropout mask on both paths
    out = LoRALayer.forward(layer, x) if module_path else layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [p.grad for p in (x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias) if p is not None]
    return [out.detach(), *[g for g in grads if g is not None]]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("train_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 12), (7, 12), (12,)])
def test_fused_equals_module_path(kind, dropout, train_bias, shape):
    layer = make(kind, dropout).train()
    layer.base_layer.bias.requires_grad_(train_bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert fusable(x, layer._plain_weight_t(), layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    fused, reference = run(layer, x, module_path=False), run(layer, x, module_path=True)
    assert len(fused) == len(reference) == 4 + train_bias - (x.grad is None)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_input_without_grad_and_no_bias():
    layer = make("linear", bias=False)
    x = torch.randn(4, 12)
    fused, reference = run(layer, x, module_path=False), run(layer, x, module_path=True)
    assert len(fused) == 3  # output, grad A, grad B
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merged_layer_runs_the_base_alone():
    layer = make("linear")
    x = torch.randn(4, 12)
    unmerged = layer(x).detach()
    layer.merge()
    assert torch.equal(layer(x), layer.base_layer(x))
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


class MyLinear(nn.Linear):
    pass


def test_module_path_wherever_fusing_could_change_the_result():
    layer = make("linear")
    x = torch.randn(4, 12)
    args = (layer._plain_weight_t(), layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    assert fusable(x, *args, layer.lora_A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(x, *args)
    assert not fusable(x.double(), *args)  # mixed dtypes (e.g. fp32 adapters on a bf16 base)
    handle = layer.lora_A.register_forward_hook(lambda module, inputs, output: None)
    assert not fusable(x, *args, layer.lora_A)  # a hook expects lora_A to be called
    handle.remove()
    trained_base = make("linear")
    trained_base.base_layer.weight.requires_grad_(True)
    assert not fusable(x, trained_base._plain_weight_t(), *args[1:])
    subclass = LoRALinear(MyLinear(12, 10), r=4, alpha=8)  # e.g. a quantized Linear: its own forward
    assert subclass._plain_weight_t() is None


def test_hooked_adapter_still_sees_its_call():
    layer = make("linear")
    calls = []
    layer.lora_A.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), LoRALayer.forward(layer, x), atol=1e-5, rtol=1e-5)
    assert calls == [(4, 4), (4, 4)]
