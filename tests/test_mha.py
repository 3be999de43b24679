"""LoRA on nn.MultiheadAttention / nn.Transformer: the adapters really change and train the attention."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from lightning.pytorch.demos.transformer import Transformer
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRALinear,
    LoRAMultiheadAttention,
    adapter_state_dict,
    find_lora_targets,
    inject_lora,
    lora_layers,
    merge_lora,
    plan_lora,
    unload_lora,
    unmerge_lora,
)

E, HEADS = 8, 2


class Attn(nn.Module):
    def __init__(self, batch_first: bool = True, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs)
        self.ff = nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x, x, x, need_weights=False)[0])


def randomize_b(model: nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, param in layer.adapter_parameters():
                if "lora_B" in name:
                    param.normal_(0, std)


def effective_copy(layer: LoRAMultiheadAttention) -> nn.MultiheadAttention:
    """A plain MultiheadAttention holding W + ΔW: what the LoRA layer must compute."""
    ref = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        ref.in_proj_weight += layer.delta_weight()
        if isinstance(ref.out_proj, LoRALinear):
            ref.out_proj.base_layer.weight += ref.out_proj.delta_weight()
            ref.out_proj = ref.out_proj.base_layer
    return ref


def adapted_mha(projections=("q", "k", "v", "out"), seed: int = 0, **mha_kwargs) -> LoRAMultiheadAttention:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, **mha_kwargs))
    inject_lora(model, target_modules=["0"], r=2, mha_projections=projections)
    randomize_b(model)
    return model[0]


def call_cases():
    n, l, s = 3, 5, 6
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(n, l, E, generator=g), torch.randn(n, s, E, generator=g)
    pad = torch.zeros(n, s, dtype=torch.bool)
    pad[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(l)
    return {
        "self_plain": ((q, q, q), dict(need_weights=False)),
        "cross_weights_per_head": ((q, kv, kv), dict(need_weights=True, average_attn_weights=False)),
        "key_padding_mask": ((q, kv, kv), dict(key_padding_mask=pad)),
        "float_attn_mask": ((q, kv, kv), dict(attn_mask=torch.randn(l, s, generator=g))),
        "is_causal": ((q, q, q), dict(attn_mask=causal, is_causal=True, need_weights=False)),
    }


CALLS = call_cases()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("call", list(CALLS))
def test_forward_equals_mha_with_effective_weights(call: str, batch_first: bool) -> None:
    layer = adapted_mha(batch_first=batch_first)
    args, kwargs = CALLS[call]
    if not batch_first:
        args = tuple(a.transpose(0, 1) for a in args)
    out, weights = layer(*args, **kwargs)
    ref_out, ref_weights = effective_copy(layer)(*args, **kwargs)
    base_out, _ = unload_lora(copy.deepcopy(nn.Sequential(layer)))[0](*args, **kwargs)
    assert (out - base_out).abs().max() > 1e-2  # B ≠ 0 moves the output
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=0)
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert torch.allclose(weights, ref_weights, atol=1e-6)


def test_projection_subset_adapts_only_those_slices() -> None:
    layer = adapted_mha(projections=("q", "v"))
    assert layer.lora_A.weight.shape == (2, E) and layer.lora_B.weight.shape == (2 * E, 2)
    assert layer.out_adapter is None and type(layer.base_layer.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    delta = layer.delta_weight()
    b_a = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
    assert torch.allclose(delta[:E], b_a[:E]) and torch.allclose(delta[2 * E :], b_a[E:])
    assert not delta[E : 2 * E].any()  # the key slice is untouched
    x = torch.randn(2, 4, E)
    assert torch.allclose(layer(x, x, x)[0], effective_copy(layer)(x, x, x)[0], atol=1e-5)


def test_merge_unmerge_unload_and_adapter_state() -> None:
    torch.manual_seed(0)
    model = Attn()
    base_state = copy.deepcopy(model.state_dict())
    inject_lora(model, target_modules=["attn"], r=2)
    randomize_b(model)
    x = torch.randn(2, 5, E)
    expected = model(x)
    assert set(adapter_state_dict(model)) == {  # PEFT's key names for an MHA adapter
        "attn.lora_A.weight",
        "attn.lora_B.weight",
        "attn.base_layer.out_proj.lora_A.weight",
        "attn.base_layer.out_proj.lora_B.weight",
    }
    merge_lora(model)
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)
    unmerge_lora(model)
    assert torch.allclose(model.attn.base_layer.in_proj_weight, base_state["attn.in_proj_weight"], atol=1e-6)
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)

    # adapter-only state into a fresh model with the same base gives the same outputs
    torch.manual_seed(0)
    fresh = inject_lora(Attn(), target_modules=["attn"], r=2)
    missing, unexpected = fresh.load_state_dict(adapter_state_dict(model), strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    assert torch.equal(fresh(x), model(x))

    unload_lora(model, merge=True)
    assert type(model.attn) is nn.MultiheadAttention and isinstance(model.attn.out_proj, nn.Linear)
    assert not lora_layers(model)
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)


def test_all_adapter_tensors_get_gradients_and_train() -> None:
    torch.manual_seed(0)
    model = inject_lora(Attn(), target_modules=["attn"], r=2)
    params = dict(model.named_parameters())
    adapters = {n: p for n, p in params.items() if "lora_" in n}
    assert len(adapters) == 4 and all(p.requires_grad for p in adapters.values())
    assert not model.attn.base_layer.in_proj_weight.requires_grad
    optimizer = torch.optim.SGD(adapters.values(), lr=0.5)
    x = torch.randn(2, 5, E)
    for step in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        for name, param in adapters.items():
            nonzero = bool(param.grad.abs().sum() > 0)
            # B gets a gradient at once; A (∂L/∂A = s·Bᵀ·...) only once B moved away from zero
            assert nonzero == ("lora_B" in name or step == 1), (name, step)
        optimizer.step()


def test_out_proj_target_goes_through_the_attention_module(caplog) -> None:
    torch.manual_seed(0)
    model = Attn()
    x = torch.randn(2, 5, E)
    base = model(x).detach()
    with caplog.at_level(logging.INFO, logger="lightning_lora.inject"):
        inject_lora(model, target_modules=["out_proj"], r=2)
    assert "Adapting `attn.out_proj` through its nn.MultiheadAttention `attn`" in caplog.text
    assert isinstance(model.attn, LoRAMultiheadAttention) and model.attn.projections == ("out",)
    assert set(adapter_state_dict(model)) == {"attn.base_layer.out_proj.lora_A.weight", "attn.base_layer.out_proj.lora_B.weight"}
    randomize_b(model)
    out = model(x)
    assert (out - base).abs().max() > 1e-2  # not a dead wrapper
    out.sum().backward()
    assert model.attn.base_layer.out_proj.lora_B.weight.grad.abs().sum() > 0


def test_exclude_out_proj_and_mha_projections_option() -> None:
    targets = find_lora_targets(Attn(), LoRAConfig(target_modules=["attn"], exclude_modules=["out_proj"]))
    assert targets == ["attn"]
    model = inject_lora(Attn(), target_modules=["attn"], exclude_modules=["out_proj"])
    assert model.attn.projections == ("q", "k", "v") and model.attn.out_adapter is None
    with pytest.raises(ValueError, match=r"mha_projections.*'q', 'k', 'v', 'out'.*got \['x'\]"):
        LoRAConfig(mha_projections=["x"])
    assert LoRAConfig(mha_projections=["v", "q"]).mha_projections == ("q", "v")
    assert LoRAConfig.from_dict(LoRAConfig(mha_projections=("q",)).to_dict()).mha_projections == ("q",)


def test_separate_kdim_vdim_rejected_with_a_clear_error() -> None:
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=4, vdim=6))
    with pytest.raises(ValueError, match=r"kdim == vdim == embed_dim.*kdim=4, vdim=6.*exclude_modules"):
        inject_lora(model, target_modules=["0"])


def test_dropout_is_reported_not_silently_dropped(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_lora.mha"):
        inject_lora(Attn(), target_modules=["attn"], dropout=0.1)
    assert "dropout=0.1 is not applied to nn.MultiheadAttention adapters" in caplog.text


def tiny_transformer(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=20, ninp=E, nhead=HEADS, nhid=16, nlayers=1, dropout=0.0)


def test_all_linear_on_torch_transformer_adapts_attention_and_ff_not_head() -> None:
    model = tiny_transformer()
    summary = plan_lora(model, LoRAConfig(target_modules="all-linear", r=2))
    enc, dec = "transformer.encoder.layers.0", "transformer.decoder.layers.0"
    assert set(summary.adapted) == {
        f"{enc}.self_attn", f"{enc}.linear1", f"{enc}.linear2",
        f"{dec}.self_attn", f"{dec}.multihead_attn", f"{dec}.linear1", f"{dec}.linear2",
    }  # fmt: skip
    assert "decoder" not in summary.adapted  # the output head
    assert summary.attention == {n: ("q", "k", "v", "out") for n in (f"{enc}.self_attn", f"{dec}.self_attn", f"{dec}.multihead_attn")}
    text = str(summary)
    assert "attention (nn.MultiheadAttention, projections q,k,v,out)" in text and f"{dec}.multihead_attn" in text
    assert not lora_layers(model)  # a dry run


def test_transformer_adapters_act_in_train_and_eval_and_merge() -> None:
    model = tiny_transformer()
    src, tgt = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    model.eval()
    with torch.no_grad():
        base = model(src, tgt)
    inject_lora(model, target_modules="all-linear", r=2)
    randomize_b(model)
    model.train()
    train_out = model(src, tgt)
    model.eval()
    with torch.no_grad():  # the eval fast paths (fused encoder layer, native MHA) must still see the adapters
        eval_out = model(src, tgt)
        assert (eval_out - base).abs().max() > 1e-1
        assert torch.allclose(eval_out, train_out, rtol=1e-4, atol=1e-4)
        merge_lora(model)
        assert torch.allclose(model(src, tgt), eval_out, rtol=1e-4, atol=1e-5)


def test_encoder_with_padding_mask_in_eval_uses_adapters() -> None:
    """TransformerEncoder's nested-tensor path (eval, no_grad, key padding mask)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 5, E)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    inject_lora(encoder, target_modules="all-linear", r=2)
    randomize_b(encoder)
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=pad)
        reference = unload_lora(copy.deepcopy(encoder), merge=True)(x, src_key_padding_mask=pad)
    keep = ~pad
    assert torch.allclose(out[keep], reference[keep], atol=1e-4)


def test_same_layout_as_peft_and_peft_counts_out_proj_twice() -> None:
    """Same names and shapes as PEFT's MHA adapter; same outputs for the in-projection.

    PEFT 0.21.2 applies the ``out_proj`` update twice (its ``MultiheadAttention.merge``
    writes ``W + ΔW`` into out_proj and then calls ``out_proj.merge()``, which adds ΔW
    again), so it computes ``W_out + 2·ΔW_out``; we compute ``W_out + ΔW_out``.
    """
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Attn()
    ours = inject_lora(copy.deepcopy(base), target_modules=["attn"], r=2, alpha=4)
    randomize_b(ours)
    with torch.no_grad():
        ours.attn.lora_A.weight.normal_()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"]))
    state = {f"base_model.model.{k[: -len('.weight')]}.default.weight": v for k, v in adapter_state_dict(ours).items()}
    peft_state = theirs.state_dict()
    assert all(k in peft_state and peft_state[k].shape == v.shape for k, v in state.items())
    theirs.load_state_dict(state, strict=False)
    x = torch.randn(2, 5, E)
    expected = theirs(x)
    assert (ours(x) - expected).abs().max() > 1e-2  # the double-counted out_proj update shows
    with torch.no_grad():
        ours.attn.out_adapter.lora_B.weight *= 2
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_peft_export_names_the_attention_module_and_round_trips(tmp_path) -> None:
    from lightning_lora import load_adapter, save_adapter

    torch.manual_seed(0)
    base = Attn()
    ours = inject_lora(copy.deepcopy(base), target_modules=["attn"], r=2, alpha=4)
    randomize_b(ours)
    with pytest.warns(UserWarning, match="out_proj update twice"):
        save_adapter(ours, tmp_path / "adapter")
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert all(".base_layer." not in name for name in (config["target_modules"] if isinstance(config["target_modules"], list) else [config["target_modules"]]))
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    x = torch.randn(2, 5, E)
    torch.testing.assert_close(reloaded(x), ours(x), rtol=0, atol=1e-6)

    only_qv = inject_lora(copy.deepcopy(base), target_modules=["attn"], r=2, alpha=4, mha_projections=("q", "v"))
    with pytest.raises(ValueError, match="adapt only .*'q', 'v'"):
        save_adapter(only_qv, tmp_path / "qv")
