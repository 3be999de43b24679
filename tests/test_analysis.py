"""lightning_lora.analysis: ΔW spectra, effective rank, φ and amplification against independent numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lora_test_modules import tiny_bert, tiny_gpt2
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_layers
from lightning_lora.analysis import (
    AdapterFactors,
    amplification,
    analyze_factors,
    analyze_model,
    delta_weight,
    effective_rank,
    layer_factors,
    lowrank_singular_values,
    module_layer_and_kind,
    short_kind,
    similarity_grids,
    subspace_similarity,
)


def _rank_k_factors(k: int, r: int = 8, d_out: int = 24, d_in: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g)
    b[:, k:] = 0  # only k of the r directions carry an update
    return a, b


def _randomize_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, param in layer.adapter_parameters():
                if param.abs().sum() == 0:
                    param.copy_(torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_rank_of_known_rank(k):
    # k equal singular values: the top j hold j/k of the energy, so 90 % and 99 % need all k (k < 10)
    sigma = torch.tensor([2.0] * k + [0.0] * (8 - k))
    assert effective_rank(sigma, 0.90) == k
    assert effective_rank(sigma, 0.99) == k
    report = analyze_factors(AdapterFactors("m", *_rank_k_factors(k), scaling=2.0))
    assert report.effective_rank_99 <= k and report.singular_values[k] < 1e-10 * report.singular_values[0]
    assert effective_rank(torch.zeros(4)) == 0
    assert effective_rank(torch.tensor([3.0, 1.0]), 0.9) == 1  # 9 / 10 reaches 90 % exactly


def test_effective_rank_decaying_spectrum():
    sigma = torch.tensor([math.sqrt(80), math.sqrt(15), math.sqrt(4), 1.0])  # energies 80, 15, 4, 1 of 100
    assert effective_rank(sigma, 0.90) == 2
    assert effective_rank(sigma, 0.99) == 3
    with pytest.raises(ValueError, match="energy"):
        effective_rank(sigma, 1.5)


@pytest.mark.parametrize("shape", [(8, 40, 30), (4, 3, 50), (16, 10, 12)])  # (r, d_in, d_out), incl. r > d
def test_lowrank_singular_values_equal_svdvals(shape):
    r, d_in, d_out = shape
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    expected = torch.linalg.svdvals(b.double() @ a.double() * 0.5)
    got = lowrank_singular_values(a, b, 0.5)
    assert got.shape == (min(r, d_in, d_out),)
    torch.testing.assert_close(got, expected[: got.numel()], rtol=1e-9, atol=1e-9)


def test_subspace_similarity_identity_and_orthogonal():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 30, generator=g)
    phi = subspace_similarity(a, a)
    torch.testing.assert_close(phi.diagonal(), torch.ones(6, dtype=torch.float64))
    q = torch.linalg.qr(torch.randn(30, 12, generator=g)).Q.T  # 12 orthonormal rows
    orth = subspace_similarity(q[:6] * 3.0, q[6:] * 0.5)
    assert orth.abs().max() < 1e-12
    # a subspace inside another: φ(i, j) = 1 once j covers it
    nested = subspace_similarity(q[:2], q[:8])
    assert nested[1, 7] == pytest.approx(1.0)


def _numpy_phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    _, _, v1 = np.linalg.svd(a1, full_matrices=False)
    _, _, v2 = np.linalg.svd(a2, full_matrices=False)
    out = np.zeros((v1.shape[0], v2.shape[0]))
    for i in range(1, v1.shape[0] + 1):
        for j in range(1, v2.shape[0] + 1):
            out[i - 1, j - 1] = np.linalg.norm(v1[:i] @ v2[:j].T, "fro") ** 2 / min(i, j)
    return out


def test_subspace_similarity_matches_numpy():
    rng = np.random.default_rng(3)
    a1, a2 = rng.standard_normal((4, 25)), rng.standard_normal((9, 25))
    np.testing.assert_allclose(subspace_similarity(torch.tensor(a1), torch.tensor(a2)).numpy(), _numpy_phi(a1, a2), atol=1e-12)


def test_amplification_matches_numpy():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((30, 20))
    delta = rng.standard_normal((30, 4)) @ rng.standard_normal((4, 20)) * 0.1
    got = amplification(torch.tensor(delta), torch.tensor(w), r=4, seed=7)
    u, _, vt = np.linalg.svd(delta)
    proj = np.linalg.norm(u[:, :4].T @ w @ vt[:4].T, "fro")
    assert got.projection_delta == pytest.approx(proj, rel=1e-10)
    assert got.delta_norm == pytest.approx(np.linalg.norm(delta, "fro"), rel=1e-12)
    assert got.factor == pytest.approx(np.linalg.norm(delta, "fro") / proj, rel=1e-10)
    assert got.projection_weight == pytest.approx(np.sqrt((np.linalg.svd(w, compute_uv=False)[:4] ** 2).sum()), rel=1e-10)
    assert got.weight_norm == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-12)
    # W's own top directions capture the most of W; a random 4-dim subspace much less
    assert got.projection_weight >= got.projection_delta and got.projection_weight > got.projection_random
    assert amplification(torch.tensor(delta), torch.tensor(w), r=4, seed=7) == got  # seeded


def test_analyze_factors_norms_and_shape_error():
    a, b = _rank_k_factors(3)
    w = torch.randn(24, 20, dtype=torch.float64)
    report = analyze_factors(AdapterFactors("encoder.layer.2.attention.self.query", a, b, 0.25), w)
    delta = delta_weight(a, b, 0.25)
    assert report.delta_norm == pytest.approx(float(delta.norm()))
    assert report.norm_ratio == pytest.approx(float(delta.norm() / w.norm()))
    assert (report.layer, report.kind) == (2, "encoder.layer.attention.self.query")
    assert report.to_dict()["amplification"]["r"] == 8
    with pytest.raises(ValueError, match=r"`encoder\.layer\.2\.attention\.self\.query`.*\(24, 20\).*\(20, 24\)"):
        analyze_factors(AdapterFactors("encoder.layer.2.attention.self.query", a, b, 0.25), w.T)


def test_layer_factors_layout_matches_each_layer_type():
    """ΔW from the factors equals the layer's own delta_weight, brought to math layout, for every type."""
    gpt2 = tiny_gpt2()  # Conv1D, stored (in, out)
    inject_lora(gpt2, LoRAConfig(r=4, target_modules=["c_attn", "wte"], use_rslora=True))
    conv = nn.Sequential(nn.Conv2d(3, 5, 3))
    inject_lora(conv, LoRAConfig(r=2, target_modules=["0"]))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    inject_lora(mha, LoRAConfig(r=2, target_modules=["0"], mha_projections=("q", "v", "out")))
    for model in (gpt2, conv, mha):
        _randomize_b(model)
        for report in analyze_model(model):
            layer = lora_layers(model)[report.name]
            factors = layer_factors(report.name, layer)
            native = layer.delta_weight().detach().double()
            if report.name.endswith(("c_attn", "wte")):
                native = native.T
            elif isinstance(layer.base_layer, nn.MultiheadAttention):  # rows of q and v only
                native = torch.cat([native[:8], native[16:]])
            delta = delta_weight(factors.lora_A, factors.lora_B, factors.scaling)
            torch.testing.assert_close(delta, native.flatten(1), rtol=1e-5, atol=1e-5)
            assert report.delta_norm == pytest.approx(float(native.norm()), rel=1e-6)
            assert report.weight_norm is not None and report.amplification is not None
    # rsLoRA: s = alpha / sqrt(r) = 16 / 2, taken from the layer
    assert layer_factors("c", lora_layers(gpt2)["transformer.h.0.attn.c_attn"]).scaling == 8.0


def test_analyze_model_refuses_merged_and_plain():
    model = tiny_bert()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        analyze_model(model)
    inject_lora(model, LoRAConfig(r=2, target_modules=["query"]))
    from lightning_lora import merge_lora

    merge_lora(model)
    with pytest.raises(ValueError, match=r"`bert\.encoder\.layer\.0\.attention\.self\.query`.*merged"):
        analyze_model(model)


def test_similarity_grids_errors_name_modules():
    a, b = _rank_k_factors(2)
    first = {"x.query": AdapterFactors("x.query", a, b, 1.0), "x.value": AdapterFactors("x.value", a, b, 1.0)}
    second = {"x.query": AdapterFactors("x.query", a[:, :10], b, 1.0)}
    with pytest.raises(ValueError, match=r"only in the first: \['x\.value'\]"):
        similarity_grids(first, second)
    second["x.value"] = first["x.value"]
    with pytest.raises(ValueError, match=r"`x\.query`.*\(8, 20\).*\(8, 10\)"):
        similarity_grids(first, second)
    grids = similarity_grids(first, {k: v for k, v in first.items()})
    assert grids["x.value"].shape == (8, 8) and grids["x.value"][7, 7] == pytest.approx(1.0)


def test_layer_and_kind_names():
    assert module_layer_and_kind("model.bert.encoder.layer.11.output.dense") == (11, "model.bert.encoder.layer.output.dense")
    assert module_layer_and_kind("classifier") == (None, "classifier")
    assert short_kind("model.bert.encoder.layer.attention.self.query") == "attention.self.query"
    assert short_kind("transformer.h.attn.c_attn") == "attn.c_attn"
    assert short_kind("classifier") == "classifier"
