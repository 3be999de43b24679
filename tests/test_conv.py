"""LoRA on nn.Conv1d and nn.Conv3d (audio, video): layout, merge, gradients, grouped convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConv1d, LoRAConv2d, LoRAConv3d, inject_lora, merge_lora
from lightning_lora.layers import LoRAConvNd, lora_layer_class

# (conv type, LoRA type, input shape): the base layers use non-trivial kernel/stride/padding/dilation
CASES = {
    "conv1d": (nn.Conv1d, LoRAConv1d, (2, 3, 17)),
    "conv3d": (nn.Conv3d, LoRAConv3d, (2, 3, 5, 6, 7)),
}
OPTIONS = {
    "k3_s2_p1": dict(kernel_size=3, stride=2, padding=1),
    "k2_d2_same": dict(kernel_size=3, dilation=2, padding="same"),
    "k1": dict(kernel_size=1),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
}


def make(case: str, options: dict, r: int = 2) -> tuple[LoRAConvNd, torch.Tensor]:
    conv_type, lora_type, shape = CASES[case]
    torch.manual_seed(0)
    base = conv_type(3, 5, **options)
    layer = lora_layer_class(base)(base, r, 4.0)
    assert type(layer) is lora_type
    return layer, torch.randn(shape)


def randomize_b(layer: LoRAConvNd) -> None:
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_update_moves_output_and_merge_equals_unmerged(case: str, options: dict) -> None:
    layer, x = make(case, options)
    base_out = layer.base_layer(x)
    assert torch.equal(layer(x), base_out)  # B = 0: starts equal to the base
    randomize_b(layer)
    out = layer(x)
    assert (out - base_out).abs().max() > 1e-2  # the adapter moves the output
    layer.merge()
    merged = layer(x)
    assert torch.allclose(merged, out, atol=1e-5, rtol=0)
    # the merged base alone computes it: ΔW went into the kernel
    assert torch.allclose(layer.base_layer(x), out, atol=1e-5, rtol=0)
    layer.unmerge()
    assert torch.allclose(layer(x), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_layout(case: str) -> None:
    layer, _ = make(case, OPTIONS["k3_s2_p1"], r=4)
    conv_type = CASES[case][0]
    nd = conv_type(1, 1, 1).weight.ndim - 2
    assert layer.lora_A.weight.shape == (4, 3) + (3,) * nd
    assert layer.lora_B.weight.shape == (5, 4) + (1,) * nd
    assert type(layer.lora_A) is conv_type and layer.lora_A.stride == layer.base_layer.stride
    assert not layer.lora_B.weight.any()


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_gradients_after_one_step(case: str) -> None:
    layer, x = make(case, OPTIONS["k3_s2_p1"])
    layer.base_layer.requires_grad_(False)  # inject_lora does this; here the layer is built by hand
    optimizer = torch.optim.SGD([p for _, p in layer.adapter_parameters()], lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        grads = {name: p.grad.abs().sum().item() for name, p in layer.adapter_parameters()}
        assert grads["lora_B.weight"] > 0
        # A's gradient is s·Bᵀ·(...): exactly zero while B = 0, non-zero after one step
        assert (grads["lora_A.weight"] > 0) == (step == 1)
        assert layer.base_layer.weight.grad is None
        optimizer.step()


def test_inject_unload_on_audio_and_video_model() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"audio": nn.Conv1d(2, 4, 5, padding=2), "video": nn.Conv3d(2, 4, 3)})
    inject_lora(model, target_modules=["audio", "video"], r=2)
    assert isinstance(model["audio"], LoRAConv1d) and isinstance(model["video"], LoRAConv3d)
    for layer in (model["audio"], model["video"]):
        randomize_b(layer)
    a, v = torch.randn(1, 2, 9), torch.randn(1, 2, 4, 4, 4)
    expected = model["audio"](a), model["video"](v)
    merge_lora(model, unload=True)
    assert type(model["audio"]) is nn.Conv1d and type(model["video"]) is nn.Conv3d
    assert torch.allclose(model["audio"](a), expected[0], atol=1e-5)
    assert torch.allclose(model["video"](v), expected[1], atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 4, 3, groups=4), nn.Conv3d(4, 8, 3, groups=2)], ids=["depthwise1d", "grouped3d"])
def test_grouped_conv_rejected_naming_groups(conv: nn.Module) -> None:
    kind = type(conv).__name__
    with pytest.raises(ValueError, match=rf"nn\.{kind} with groups=1 only; got groups={conv.groups} .*exclude_modules"):
        inject_lora(nn.Sequential(conv), target_modules=["0"])


def test_lora_type_must_fit_the_conv() -> None:
    with pytest.raises(TypeError, match="LoRAConv2d cannot wrap a Conv1d"):
        LoRAConv2d(nn.Conv1d(2, 2, 1), 1, 1.0)
