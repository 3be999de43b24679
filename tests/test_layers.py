"""LoRA layer math: h = base(x) + s · B A x, merge/unmerge, dropout, init and adapter dtype.

References are computed by hand from the explicit matrices W, A, B (never through the
layer's own `delta_weight`), in float32 with tight tolerances.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora.layers import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear, lora_layer_class

TOL = dict(atol=1e-5, rtol=1e-5)


def factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as matrices: A (r, in...), B (out, r)."""
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight.flatten(1)


def randomize(layer: LoRALayer, seed: int = 0) -> None:
    """Non-zero A and B (the embedding's A starts at zero, the dense B does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g))


def manual_delta(layer: LoRALayer) -> torch.Tensor:
    """ΔW = s · B A in the base weight's layout, written out per layer type."""
    a, b = (t.detach().float() for t in factors(layer))
    s = layer.scaling
    if isinstance(layer, LoRAConv2d):
        return s * torch.einsum("or,rikl->oikl", b, a)
    delta = s * (b @ a)  # (out, in)
    if isinstance(layer, (LoRAConv1D, LoRAEmbedding)):
        return delta.T  # Conv1D stores (in, out); Embedding (num_embeddings, dim)
    return delta


def manual_forward(layer: LoRALayer, weight: torch.Tensor, x: torch.Tensor, adapter_x=None) -> torch.Tensor:
    """Output with effective weight `weight` plus the update s·B A applied to `adapter_x`."""
    base = layer.base_layer
    a, b = (t.detach() for t in factors(layer))
    s = layer.scaling
    ax = x if adapter_x is None else adapter_x
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().to(weight.dtype)
    if isinstance(layer, LoRAEmbedding):
        return weight[x] + s * (a.T[x] @ b.T)
    if isinstance(layer, LoRAConv2d):
        # ΔW composed by hand, applied as one convolution with the base layer's geometry.
        out = F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation)
        delta = s * torch.einsum("or,rikl->oikl", b, a)
        return out + F.conv2d(ax, delta, None, base.stride, base.padding, base.dilation)
    if isinstance(layer, LoRAConv1D):
        return x @ weight + bias + s * (ax @ a.T @ b.T)
    return x @ weight.T + bias + s * (ax @ a.T @ b.T)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    cls: type
    input: Callable[[torch.Generator], torch.Tensor]


CASES = [
    Case("linear", lambda: nn.Linear(12, 10), LoRALinear, lambda g: torch.randn(3, 5, 12, generator=g)),
    Case("conv1d", lambda: Conv1D(10, 12), LoRAConv1D, lambda g: torch.randn(3, 5, 12, generator=g)),
    Case("embedding", lambda: nn.Embedding(20, 10), LoRAEmbedding, lambda g: torch.randint(0, 20, (3, 5), generator=g)),
    Case(
        "conv2d_k3s2p1",
        lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
        LoRAConv2d,
        lambda g: torch.randn(2, 3, 9, 9, generator=g),
    ),
    Case("conv2d_k1", lambda: nn.Conv2d(3, 6, 1), LoRAConv2d, lambda g: torch.randn(2, 3, 5, 5, generator=g)),
]
IDS = [c.name for c in CASES]


def build(case: Case, r: int = 4, alpha: float = 8.0, seed: int = 0, **kwargs) -> tuple[LoRALayer, torch.Tensor]:
    torch.manual_seed(seed)
    base = case.make()
    layer = case.cls(base, r, alpha, **kwargs)
    x = case.input(torch.Generator().manual_seed(seed + 100))
    return layer, x


def base_copy(layer: LoRALayer) -> nn.Module:
    return copy.deepcopy(layer.base_layer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dispatch(case):
    assert lora_layer_class(case.make()) is case.cls


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_step_zero_output_equals_base_exactly(case):
    layer, x = build(case)
    reference = base_copy(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_output_matches_hand_computed_reference(case, use_rslora):
    layer, x = build(case, r=3, alpha=5.0, use_rslora=use_rslora)
    randomize(layer)
    assert layer.scaling == (5.0 / math.sqrt(3) if use_rslora else 5.0 / 3)
    base = base_copy(layer)
    with torch.no_grad():
        out = layer(x)
        expected = manual_forward(layer, base.weight, x)
        # The update is really there (not a vacuous comparison) ...
        assert (out - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(out, expected, **TOL)
        # ... and equals base(x) + the hand-computed part.
        torch.testing.assert_close(out - base(x), expected - base(x), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge(case):
    layer, x = build(case)
    randomize(layer)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        delta = manual_delta(layer)
        assert delta.shape == w0.shape

        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0 + delta, atol=1e-6, rtol=0)
        merged_weight = layer.base_layer.weight.clone()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        # A merged layer computes exactly what its (merged) base computes: no second update.
        assert torch.equal(layer(x), layer.base_layer(x))

        layer.merge()  # idempotent
        assert torch.equal(layer.base_layer.weight, merged_weight)

        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        layer.unmerge()  # idempotent too
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.cls is not LoRAEmbedding], ids=lambda c: c.name)
def test_dropout_applies_to_adapter_path_only(case):
    p = 0.5
    layer, x = build(case, dropout=p)
    randomize(layer)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    base = base_copy(layer)
    layer.train()
    with torch.no_grad():
        torch.manual_seed(123)
        out = layer(x)
        # Replay the same draw: the mask nn.Dropout used on the adapter input.
        torch.manual_seed(123)
        dropped = F.dropout(x, p, training=True)
        assert not torch.equal(dropped, x)
        expected = manual_forward(layer, base.weight, x, adapter_x=dropped)
        torch.testing.assert_close(out, expected, **TOL)
        # Different masks give different outputs: dropout is active in training.
        assert not torch.allclose(layer(x), layer(x))

        layer.eval()
        torch.testing.assert_close(layer(x), manual_forward(layer, base.weight, x), **TOL)
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("case", [c for c in CASES if c.cls is not LoRAEmbedding], ids=lambda c: c.name)
def test_dropout_leaves_base_path_alone_at_init(case):
    # With B = 0 the adapter contributes exactly zero, so any dropout on the base path would show.
    layer, x = build(case, dropout=0.9)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), base_copy(layer)(x))


def test_embedding_has_no_dropout_on_ids():
    layer, x = build(CASES[2], dropout=0.5)
    randomize(layer)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    ("case", "a_shape", "b_shape"),
    [
        (CASES[0], (4, 12), (10, 4)),
        (CASES[1], (4, 12), (10, 4)),
        (CASES[2], (4, 20), (10, 4)),
        (CASES[3], (4, 3, 3, 3), (6, 4, 1, 1)),
        (CASES[4], (4, 3, 1, 1), (6, 4, 1, 1)),
    ],
    ids=IDS,
)
def test_adapter_shapes_and_names_follow_peft(case, a_shape, b_shape):
    layer, _ = build(case, r=4)
    names = dict(layer.adapter_parameters())
    if case.cls is LoRAEmbedding:
        assert set(names) == {"lora_embedding_A", "lora_embedding_B"}
        a, b = names["lora_embedding_A"], names["lora_embedding_B"]
    else:
        assert set(names) == {"lora_A.weight", "lora_B.weight"}
        a, b = names["lora_A.weight"], names["lora_B.weight"]
    assert tuple(a.shape) == a_shape
    assert tuple(b.shape) == b_shape
    if case.cls is LoRAConv2d:
        base = layer.base_layer
        assert (layer.lora_A.kernel_size, layer.lora_A.stride, layer.lora_A.padding) == (
            base.kernel_size,
            base.stride,
            base.padding,
        )
        assert layer.lora_B.kernel_size == (1, 1) and layer.lora_B.stride == (1, 1)


@pytest.mark.parametrize(
    ("make", "cls", "fan_in"),
    [
        (lambda: nn.Linear(64, 48), LoRALinear, 64),
        (lambda: Conv1D(48, 64), LoRAConv1D, 64),
        (lambda: nn.Conv2d(8, 16, 3), LoRAConv2d, 8 * 9),
    ],
    ids=["linear", "conv1d", "conv2d"],
)
def test_dense_init_kaiming_uniform_a_zero_b(make, cls, fan_in):
    torch.manual_seed(0)
    layer = cls(make(), 16, 32.0)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound  # uses the whole range (not a narrower init)
    assert abs(a.mean().item()) < 0.1 * bound
    torch.testing.assert_close(a.std().item(), bound / math.sqrt(3), atol=0.1 * bound, rtol=0)
    assert torch.count_nonzero(b) == 0


def test_embedding_init_a_zero_b_normal():
    torch.manual_seed(0)
    layer = LoRAEmbedding(nn.Embedding(50, 64), 16, 32.0)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0
    b = layer.lora_embedding_B
    assert abs(b.mean().item()) < 0.1
    assert 0.9 < b.std().item() < 1.1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_dtype_pinned_through_cast(case):
    layer, x = build(case)
    randomize(layer)
    a0, b0 = (t.detach().clone() for t in factors(layer))
    w0 = layer.base_layer.weight.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    for name, p in layer.adapter_parameters():
        assert p.dtype == torch.float32, name
    # The values survive exactly: they were never rounded through bf16.
    a1, b1 = factors(layer)
    assert torch.equal(a1, a0) and torch.equal(b1, b0)

    xb = x if case.cls is LoRAEmbedding else x.to(torch.bfloat16)
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    expected = manual_forward(layer, w0.float(), x)  # fp32 reference with the fp32 weights
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.03)
    # The bf16 base path plus the fp32 adapter path, cast once at the end.
    base_out = layer.base_layer(xb)
    with torch.no_grad():
        assert torch.equal(layer(xb), base_out + layer.lora_forward(xb).to(torch.bfloat16))

    out.float().pow(2).sum().backward()
    for name, p in layer.adapter_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert p.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in layer.adapter_parameters()}

    layer.to(torch.float16).float()  # another round trip keeps adapters and their grads intact
    assert layer.base_layer.weight.dtype == torch.float32
    for name, p in layer.adapter_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p.grad, grads[name]), name
    a2, b2 = factors(layer)
    assert torch.equal(a2, a0) and torch.equal(b2, b0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_dtype_none_follows_cast(case):
    layer, x = build(case, adapter_dtype=None)
    randomize(layer)
    layer.to(torch.bfloat16)
    for name, p in layer.adapter_parameters():
        assert p.dtype == torch.bfloat16, name
    xb = x if case.cls is LoRAEmbedding else x.to(torch.bfloat16)
    assert layer(xb).dtype == torch.bfloat16


def test_adapter_dtype_none_takes_base_dtype_at_creation():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float64), 2, 4.0, adapter_dtype=None)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float64
    pinned = LoRALinear(nn.Linear(4, 4, dtype=torch.float64), 2, 4.0)
    assert pinned.lora_A.weight.dtype == torch.float32


def test_merge_into_bf16_base_is_computed_in_fp32():
    layer, x = build(CASES[0])
    randomize(layer)
    layer.to(torch.bfloat16)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    expected = (w0.float() + manual_delta(layer)).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, expected)


def test_conv2d_groups_rejected():
    with pytest.raises(ValueError, match=r"groups=1 only; got groups=2.*exclude_modules"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 4.0)


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 8.0),
    batch=st.integers(1, 4),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_merged_equals_unmerged(in_features, out_features, r, alpha, batch, rslora, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features), r, alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(batch, in_features)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        torch.testing.assert_close(unmerged, layer.base_layer(x) + layer.scaling * (x @ a.T @ b.T), **TOL)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, w0 + layer.scaling * (b @ a), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, **TOL)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    in_channels=st.integers(1, 4),
    out_channels=st.integers(1, 5),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_conv2d_merged_equals_unmerged(in_channels, out_channels, kernel, stride, padding, r, seed):
    torch.manual_seed(seed)
    layer = LoRAConv2d(nn.Conv2d(in_channels, out_channels, kernel, stride, padding), r, 2.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(2, in_channels, 6, 6)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, **TOL)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
