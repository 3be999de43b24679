"""What the trained adapters learned: the LoRA paper's analyses of ΔW (Hu et al. 2021, Section 7).

Plain functions over tensors, computed in float64 on the CPU whatever the adapters' dtype or
device, in the paper's symbols. Every adapter is taken in one "math" layout: ``A`` is
``(r, d_in)`` and ``B`` is ``(d_out, r)``, so that ``ΔW = s · B A`` is ``(d_out, d_in)`` and
``W`` is brought to the same layout (:func:`base_weight_matrix`: transposed for transformers
``Conv1D`` and ``nn.Embedding``, flattened for convolutions). Norms and singular values do not
depend on that choice; the amplification projection needs ``W`` and ``ΔW`` in one layout.

* :func:`effective_rank`, :func:`analyze_factors`: the spectrum of ΔW, the smallest k holding
  90 % / 99 % of Σσ², ``‖ΔW‖_F``, ``‖W‖_F`` and their ratio (Section 7.2: "how small can r be").
* :func:`subspace_similarity`: φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) between the top-i and
  top-j right-singular directions of two adapters' A (Section 7.2, Figure 3).
* :func:`amplification`: ‖Uᵀ W V‖_F for ΔW's own top-r directions against W's and a random
  subspace's, and the factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (Section 7.3, Table 7).
* :func:`lowrank_singular_values`: σ(s·B A) from the small factors (r × r), without forming ΔW;
  what :class:`~lightning_lora.monitor.LoRAMonitor` uses during training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_lora.inject import lora_layers
from lightning_lora.layers import LoRAConvNd, LoRAEmbedding, LoRALayer, conv1d_type
from lightning_lora.mha import LoRAMultiheadAttention

#: The energy levels (share of Σσ²) at which :func:`analyze_factors` reports the effective rank.
ENERGY_LEVELS = (0.90, 0.99)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


# -- spectra ----------------------------------------------------------------------------------
def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW = s · B A in float64, ``(d_out, d_in)``; convolution factors are flattened first."""
    return _f64(lora_B).flatten(1) @ _f64(lora_A).flatten(1) * scaling


def lowrank_singular_values(lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0) -> Tensor:
    """The singular values of ΔW = s · B A, computed from the factors only (descending, float64).

    With thin QR factorisations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (orthonormal columns),
    ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``, so ΔW has the singular values of the small ``r × r`` core
    ``s · R_B R_Aᵀ``. The cost is ``O((d_in + d_out) r²)`` instead of ``O(d_in d_out r)`` to form
    ΔW plus its SVD, and the core is as well conditioned as ΔW itself (unlike eigenvalues of a
    Gram product such as ``(BᵀB)(AAᵀ)``, which square the condition number).

    Returns ``min(r, d_in, d_out)`` values.
    """
    a, b = _f64(lora_A).flatten(1), _f64(lora_B).flatten(1)
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}: their ranks r differ.")
    return torch.linalg.svdvals(_r_factor(b) @ _r_factor(a.T).T) * abs(scaling)


def _r_factor(m: Tensor) -> Tensor:
    """R of the thin QR of ``m`` (``(min(rows, cols), cols)``, upper triangular).

    Read from LAPACK's ``geqrf`` output directly, masked below the diagonal. ``torch.linalg.qr``
    and ``Tensor.triu`` cost ~20 ms even on tiny matrices on a busy multi-threaded CPU (thread-pool
    wake-ups), 1000x this.
    """
    packed, _ = torch.geqrf(m)
    k = min(m.shape)
    upper = torch.arange(k)[:, None] <= torch.arange(m.shape[1])[None, :]
    return packed[:k] * upper


def effective_rank(singular_values: Tensor, energy: float = 0.90) -> int:
    """The smallest k whose top-k singular values hold at least ``energy`` of Σσ² (0 for ΔW = 0)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1], got {energy}.")
    power = _f64(singular_values).flatten().sort(descending=True).values ** 2
    total = power.sum()
    if total <= 0:
        return 0
    share = power.cumsum(0) / total
    # A share that is `energy` up to rounding counts as reaching it (e.g. 0.9 from a sum of squares).
    return int((share < energy - 1e-12).sum().item()) + 1


# -- subspace similarity (Section 7.2) --------------------------------------------------------
def subspace_similarity(lora_A1: Tensor, lora_A2: Tensor) -> Tensor:
    """The grid φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) for i ≤ r₁, j ≤ r₂ (entry ``[i-1, j-1]``).

    ``Uⁱ`` holds the top-i right-singular vectors of A (the rows of ``Vᵀ`` in ``A = U Σ Vᵀ``:
    directions in the layer's input space). φ is 1 when one subspace contains the other and 0
    when they are orthogonal. The paper compares r = 8 with r = 64 adapters of the same weight,
    and two seeds of the same r (Figures 3 and 4).
    """
    a1, a2 = _f64(lora_A1).flatten(1), _f64(lora_A2).flatten(1)
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(
            f"The two lora_A matrices act on inputs of different sizes ({a1.shape[1]} vs {a2.shape[1]}); "
            "φ compares adapters of the same module."
        )
    v1 = torch.linalg.svd(a1, full_matrices=False).Vh  # (min(r1, d), d)
    v2 = torch.linalg.svd(a2, full_matrices=False).Vh
    overlap = (v1 @ v2.T) ** 2  # [i, j] = (u1_i · u2_j)²
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U1ⁱᵀ U2ʲ‖²_F
    i = torch.arange(1, cumulative.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, cumulative.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


# -- amplification (Section 7.3) ---------------------------------------------------------------
@dataclass
class Amplification:
    """How ΔW relates to W (paper Table 7), for the top ``r`` directions.

    Attributes:
        r: Number of directions projected on.
        delta_norm: ‖ΔW‖_F.
        weight_norm: ‖W‖_F.
        projection_delta: ‖Uᵀ W V‖_F with U, V the top-r left/right singular vectors of ΔW.
        projection_weight: The same with W's own top-r singular vectors (= √(σ₁² + … + σ_r²) of W).
        projection_random: The same with a random r-dimensional subspace on each side (seeded).
        factor: ‖ΔW‖_F / ‖Uᵀ W V‖_F with ΔW's directions: how much ΔW amplifies directions
            that W already has but does not emphasise (the paper finds ≈ 20 for r = 4 on GPT-3 W_q).
    """

    r: int
    delta_norm: float
    weight_norm: float
    projection_delta: float
    projection_weight: float
    projection_random: float
    factor: float


def amplification(delta: Tensor, weight: Tensor, r: int, seed: int = 0) -> Amplification:
    """Project W onto ΔW's top-r singular subspaces and compare with W's own and a random one.

    Args:
        delta: ΔW, ``(d_out, d_in)``.
        weight: W in the same layout (see :func:`base_weight_matrix`).
        r: Number of directions, usually the adapter's rank (capped at ``min(d_out, d_in)``).
        seed: Seed of the random baseline subspace.
    """
    delta, weight = _f64(delta), _f64(weight)
    if delta.shape != weight.shape:
        raise ValueError(f"ΔW is {tuple(delta.shape)} but W is {tuple(weight.shape)}; they must have one layout.")
    r = max(1, min(r, *delta.shape))
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    uw, sw, _ = torch.linalg.svd(weight, full_matrices=False)
    generator = torch.Generator().manual_seed(seed)
    q_left = torch.linalg.qr(torch.randn(delta.shape[0], r, generator=generator, dtype=torch.float64)).Q
    q_right = torch.linalg.qr(torch.randn(delta.shape[1], r, generator=generator, dtype=torch.float64)).Q
    projection_delta = float(torch.linalg.matrix_norm(u[:, :r].T @ weight @ vh[:r].T))
    delta_norm = float(torch.linalg.matrix_norm(delta))
    return Amplification(
        r=r,
        delta_norm=delta_norm,
        weight_norm=float(torch.linalg.matrix_norm(weight)),
        projection_delta=projection_delta,
        projection_weight=float(sw[:r].square().sum().sqrt()),
        projection_random=float(torch.linalg.matrix_norm(q_left.T @ weight @ q_right)),
        factor=delta_norm / projection_delta if projection_delta > 0 else math.inf,
    )


# -- one adapted module ---------------------------------------------------------------------
@dataclass
class AdapterFactors:
    """One adapted module's update in math layout: ΔW = ``scaling`` · ``lora_B`` ``lora_A``.

    Attributes:
        name: The module's qualified name (as in the checkpoint or adapter file).
        lora_A: ``(r, d_in)`` (convolution kernels flattened into ``d_in``).
        lora_B: ``(d_out, r)``.
        scaling: s = alpha / r, or alpha / √r with rsLoRA: the layer's own value.
    """

    name: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape in math layout, ``(d_out, d_in)``."""
        return int(self.lora_B.shape[0]), int(self.lora_A.flatten(1).shape[1])


@dataclass
class ModuleReport:
    """Every number the analysis gives for one adapted module (JSON-ready through :meth:`to_dict`).

    ``weight_norm``, ``norm_ratio`` and ``amplification`` are None without the base weight W.
    """

    name: str
    layer: Optional[int]
    kind: str
    shape: tuple[int, int]
    r: int
    scaling: float
    singular_values: list[float]
    effective_rank_90: int
    effective_rank_99: int
    delta_norm: float
    weight_norm: Optional[float] = None
    norm_ratio: Optional[float] = None
    amplification: Optional[Amplification] = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def module_layer_and_kind(name: str) -> tuple[Optional[int], str]:
    """``(layer index, kind)`` of a module name: the last integer component, and the name without it.

    ``model.bert.encoder.layer.3.attention.self.query`` → ``(3, "model.bert.encoder.layer.attention.self.query")``;
    modules of one kind in every layer share the kind. A name without an integer gives ``(None, name)``.
    """
    parts = name.split(".")
    positions = [i for i, p in enumerate(parts) if p.isdigit()]
    if not positions:
        return None, name
    at = positions[-1]
    return int(parts[at]), ".".join(parts[:at] + parts[at + 1 :])


def short_kind(kind: str) -> str:
    """The part of a kind after the layer container, for labels (``attention.self.query``)."""
    for marker in (".layer.", ".layers.", ".h.", ".blocks.", ".block."):
        if marker in f".{kind}.":
            rest = f".{kind}.".split(marker, 1)[1].strip(".")
            if rest:
                return rest
    return kind.rsplit(".", 1)[-1]


def analyze_factors(
    factors: AdapterFactors, weight: Optional[Tensor] = None, seed: int = 0
) -> ModuleReport:
    """Spectrum, effective ranks and norms of ΔW, plus ‖W‖_F, the ratio and amplification when W is given.

    Args:
        factors: The module's adapter.
        weight: The module's frozen base weight W, in math layout (:func:`base_weight_matrix`).
        seed: Seed of the random subspace in :func:`amplification`.
    """
    delta = delta_weight(factors.lora_A, factors.lora_B, factors.scaling)
    if weight is not None and tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(
            f"Module `{factors.name}`: the adapter's ΔW is {tuple(delta.shape)} but the base weight is "
            f"{tuple(weight.shape)}; the adapter was trained on another base model."
        )
    sigma = torch.linalg.svdvals(delta)[: factors.r]
    layer, kind = module_layer_and_kind(factors.name)
    report = ModuleReport(
        name=factors.name,
        layer=layer,
        kind=kind,
        shape=factors.shape,
        r=factors.r,
        scaling=float(factors.scaling),
        singular_values=sigma.tolist(),
        effective_rank_90=effective_rank(sigma, ENERGY_LEVELS[0]),
        effective_rank_99=effective_rank(sigma, ENERGY_LEVELS[1]),
        delta_norm=float(torch.linalg.matrix_norm(delta)),
    )
    if weight is not None:
        report.amplification = amplification(delta, weight, factors.r, seed)
        report.weight_norm = report.amplification.weight_norm
        report.norm_ratio = report.delta_norm / report.weight_norm if report.weight_norm > 0 else math.inf
    return report


# -- factors and W from layers and modules -----------------------------------------------------
def base_weight_matrix(module: nn.Module, mha_projections: Sequence[str] = ("q", "k", "v")) -> Tensor:
    """The frozen weight W of a (base) module in math layout ``(d_out, d_in)``, float64 on CPU.

    ``nn.Linear`` as is; transformers ``Conv1D`` (stored ``(in, out)``) and ``nn.Embedding``
    (``(num_embeddings, dim)``, adapted as ``dim × num_embeddings``) transposed; convolutions
    flattened to ``(out_channels, in_channels · kernel)``. For ``nn.MultiheadAttention`` the
    rows of ``in_proj_weight`` of the adapted ``mha_projections``, stacked in q, k, v order as B
    stacks them (see :mod:`lightning_lora.mha`).
    """
    if isinstance(module, LoRALayer):
        raise ValueError("Pass the base layer (``layer.base_layer``), not the LoRA layer.")
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return _f64(module.weight).T
    if isinstance(module, nn.Embedding):
        return _f64(module.weight).T
    if isinstance(module, nn.MultiheadAttention):
        e, w = module.embed_dim, _f64(module.in_proj_weight)
        return torch.cat([w[i * e : (i + 1) * e] for i, p in enumerate("qkv") if p in mha_projections])
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _f64(module.weight).flatten(1)
    raise TypeError(f"No base weight layout known for {type(module).__name__}.")


def layer_factors(name: str, layer: LoRALayer) -> AdapterFactors:
    """The :class:`AdapterFactors` of a LoRA layer of a live model."""
    if isinstance(layer, LoRAEmbedding):
        a, b = layer.lora_embedding_A, layer.lora_embedding_B
    else:
        a, b = layer.lora_A.weight, layer.lora_B.weight
    if isinstance(layer, LoRAConvNd):
        a, b = a.flatten(1), b.flatten(1)
    return AdapterFactors(name=name, lora_A=_f64(a), lora_B=_f64(b), scaling=float(layer.scaling))


def _layer_base_weight(name: str, layer: LoRALayer) -> Tensor:
    if layer.merged:
        raise ValueError(f"Module `{name}`: the adapter is merged into W; call `unmerge_lora(model)` before analysing.")
    if isinstance(layer, LoRAMultiheadAttention):
        return base_weight_matrix(layer.base_layer, layer.in_projections)
    return base_weight_matrix(layer.base_layer)


def analyze_model(model: nn.Module, seed: int = 0) -> list[ModuleReport]:
    """:func:`analyze_factors` for every LoRA layer of a live (unmerged) model, W from its base layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapters; inject or load some first.")
    reports = []
    for name, layer in layers.items():
        if isinstance(layer, LoRAMultiheadAttention) and not layer.in_projections:
            continue  # only `out_proj` is adapted: that LoRALinear is its own entry
        reports.append(analyze_factors(layer_factors(name, layer), _layer_base_weight(name, layer), seed))
    return reports


def similarity_grids(first: dict[str, AdapterFactors], second: dict[str, AdapterFactors]) -> dict[str, Tensor]:
    """φ grids (:func:`subspace_similarity`) of two adapters, module by module.

    Both adapters must adapt the same modules with inputs of the same size; otherwise a
    ``ValueError`` names the modules found in only one of them, or the module whose sizes differ.
    """
    only_first, only_second = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if only_first or only_second:
        raise ValueError(
            "The two adapters adapt different modules: "
            f"only in the first: {only_first[:5] or 'none'}; only in the second: {only_second[:5] or 'none'}. "
            "φ compares adapters of the same modules (e.g. r=8 vs r=64 on the same targets)."
        )
    grids = {}
    for name in first:
        a1, a2 = first[name].lora_A, second[name].lora_A
        if a1.flatten(1).shape[1] != a2.flatten(1).shape[1]:
            raise ValueError(
                f"Module `{name}`: lora_A is {tuple(a1.shape)} in the first adapter but {tuple(a2.shape)} in the "
                "second; the adapters were trained on different base models."
            )
        grids[name] = subspace_similarity(a1, a2)
    return grids


__all__ = [
    "ENERGY_LEVELS",
    "AdapterFactors",
    "Amplification",
    "ModuleReport",
    "amplification",
    "analyze_factors",
    "analyze_model",
    "base_weight_matrix",
    "delta_weight",
    "effective_rank",
    "layer_factors",
    "lowrank_singular_values",
    "module_layer_and_kind",
    "short_kind",
    "similarity_grids",
    "subspace_similarity",
]
