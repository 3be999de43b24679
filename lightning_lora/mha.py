"""LoRA on ``nn.MultiheadAttention``, in a way its forward really uses.

``nn.MultiheadAttention`` has no ``nn.Linear`` for its input projection (one packed
``in_proj_weight``, ``(3·E, E)``, rows q | k | v) and never calls ``out_proj``'s forward:
it hands ``in_proj_weight``, ``out_proj.weight`` and ``out_proj.bias`` straight to
``F.multi_head_attention_forward`` (or to a fused kernel in eval mode). A LoRA wrapper put
in place of ``out_proj`` is therefore dead: it changes nothing and never trains
(``shared/notes/torch-transformer-pitfalls.md``).

:class:`LoRAMultiheadAttention` wraps the attention module itself and runs the *original*
``nn.MultiheadAttention.forward`` with the effective weights substituted
(``torch.func.functional_call``)::

    in_proj_weight  ← W_in  + s · scatter(B A)   (rows of the selected q/k/v slices)
    out_proj.weight ← W_out + s · B_o A_o

so every option of the original forward keeps its exact meaning (``batch_first``,
``attn_mask``, ``key_padding_mask``, ``need_weights``, ``average_attn_weights``,
``is_causal``, ``bias_k``/``bias_v``, ``add_zero_attn``, eval-mode fast path with
``torch.no_grad``), and autograd reaches A and B through the substituted weights.

Layout (PEFT's for the default ``mha_projections=("q", "k", "v", "out")``, so adapter files
keep PEFT's key names): ``<mha>.lora_A.weight`` is ``(r, E)``, ``<mha>.lora_B.weight`` is
``(n·E, r)`` for the ``n`` selected in-projection slices in q, k, v order, sharing one A;
``out_proj`` becomes a :class:`~lightning_lora.layers.LoRALinear` inside the wrapped module,
``<mha>.base_layer.out_proj.lora_A.weight`` ``(r, E)`` and ``...lora_B.weight`` ``(E, r)``.

Costs and limits:

* ΔW is materialised every forward: ``n·E²·r + E²·r`` multiply-adds per attention module and
  step (plus the same again in backward), instead of the ``O(tokens·E·r)`` of a Linear's
  two thin products. ``benchmarks/mha_cost.py`` measures it against a training step.
* Adapter dropout (``LoRAConfig.dropout``) cannot act on the adapter's input when the update
  enters through the weight; it is not applied to attention adapters (a warning says so at
  injection).
* With a half-precision base, the effective weight ``W + ΔW`` is rounded to the base
  dtype in the forward (use ``"bf16-mixed"`` rather than ``"bf16-true"`` for tiny updates).
* Separate q/k/v weights (``kdim``/``vdim`` different from ``embed_dim``) are rejected with
  an error; a merged model has no extra cost at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_lora.config import MHA_PROJECTIONS
from lightning_lora.layers import LoRALayer, LoRALinear, LoRAWeight, _init_dense_pair

log = logging.getLogger(__name__)

_IN_PROJ = ("q", "k", "v")


class LoRAMultiheadAttention(LoRALayer):
    """LoRA around ``nn.MultiheadAttention``: ``h = MHA(q, k, v; W_in + ΔW_in, W_out + ΔW_out)``.

    ``ΔW_in = s · B A`` scattered into the rows of the selected q/k/v slices of the packed
    ``in_proj_weight`` (A ``(r, E)`` shared, B ``(n·E, r)``); ``ΔW_out = s · B_o A_o`` of the
    :class:`LoRALinear` that replaces ``out_proj`` inside the wrapped module when ``"out"``
    is selected. Both start at zero (B = 0), so the wrapped model starts equal to the base.

    Args:
        base_layer: The attention module, with ``kdim == vdim == embed_dim``.
        r, alpha: Rank and scale numerator, as for every LoRA layer.
        projections: Which of ``"q"``, ``"k"``, ``"v"``, ``"out"`` get adapters.
        **kwargs: ``dropout``, ``use_rslora``, ``adapter_dtype`` as for :class:`LoRALayer`.
    """

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        r: int,
        alpha: float,
        projections: Sequence[str] = MHA_PROJECTIONS,
        **kwargs: Any,
    ) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                f"LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one packed in_proj_weight); got "
                f"embed_dim={base_layer.embed_dim}, kdim={base_layer.kdim}, vdim={base_layer.vdim}, whose separate "
                "q_proj_weight/k_proj_weight/v_proj_weight are not supported. Exclude this module (exclude_modules) "
                "or target other layers."
            )
        unknown = [p for p in projections if p not in MHA_PROJECTIONS]
        if unknown or not projections:
            raise ValueError(f"`projections` must be a non-empty subset of {MHA_PROJECTIONS}, got {tuple(projections)}.")
        super().__init__(base_layer, r, alpha, **kwargs)
        self.projections = tuple(p for p in MHA_PROJECTIONS if p in projections)
        self.in_projections = tuple(p for p in _IN_PROJ if p in self.projections)
        embed_dim = base_layer.embed_dim
        weight = base_layer.in_proj_weight
        dtype = self.adapter_dtype or weight.dtype
        self.lora_dropout = nn.Identity()  # the update enters through the weight: no input to drop
        if self.in_projections:
            self.lora_A = LoRAWeight(r, embed_dim, dtype=dtype, device=weight.device)
            self.lora_B = LoRAWeight(len(self.in_projections) * embed_dim, r, dtype=dtype, device=weight.device)
            if weight.device.type != "meta":
                _init_dense_pair(self.lora_A.weight, self.lora_B.weight)
        if "out" in self.projections and not isinstance(base_layer.out_proj, LoRALinear):
            base_layer.out_proj = LoRALinear(base_layer.out_proj, r, alpha, **kwargs).train(base_layer.training)
            base_layer.out_proj.lora_dropout = nn.Identity()
        if kwargs.get("dropout", 0.0):
            log.warning(
                "LoRA dropout=%s is not applied to nn.MultiheadAttention adapters: their update enters through the "
                "attention weights, not through an input that could be dropped.",
                kwargs["dropout"],
            )

    # -- the attention interface, for code that inspects the module (TransformerEncoderLayer does) ----------
    @property
    def weight(self) -> Tensor:
        """The packed ``in_proj_weight`` (the tensor :meth:`merge` folds ΔW into)."""
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The packed ``in_proj_bias``."""
        return self.base_layer.in_proj_bias

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") and name != "_qkv_same_embed_dim" or name == "base_layer":
                raise
            # embed_dim, num_heads, batch_first, in_proj_weight, out_proj, merge_masks, ...
            return getattr(self._modules["base_layer"], name)

    # -- LoRA ---------------------------------------------------------------------------------------------
    @property
    def out_adapter(self) -> Optional[LoRALinear]:
        """The LoRA layer around ``out_proj``, or None when ``"out"`` is not adapted."""
        out_proj = self.base_layer.out_proj
        return out_proj if isinstance(out_proj, LoRALinear) else None

    def delta_weight(self) -> Tensor:
        """ΔW for ``in_proj_weight`` in float32, ``(3·E, E)``, zero in the rows of unadapted slices."""
        base = self.base_layer.in_proj_weight
        if not self.in_projections:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        embed_dim = self.base_layer.embed_dim
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (n·E, E)
        if len(self.in_projections) == len(_IN_PROJ):
            return delta
        full = delta.new_zeros(base.shape)
        for i, name in enumerate(self.in_projections):
            j = _IN_PROJ.index(name)
            full[j * embed_dim : (j + 1) * embed_dim] = delta[i * embed_dim : (i + 1) * embed_dim]
        return full

    def _mergeable_base_weight(self) -> Tensor:
        weight = self.base_layer.in_proj_weight
        if not weight.is_floating_point():
            raise TypeError(f"Cannot merge LoRA into nn.MultiheadAttention: in_proj_weight is stored as {weight.dtype}.")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into ``in_proj_weight`` and, if adapted, into ``out_proj.weight``. Idempotent."""
        super().merge()
        if self.out_adapter is not None:
            self.out_adapter.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract both ΔW again."""
        super().unmerge()
        if self.out_adapter is not None:
            self.out_adapter.unmerge()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        base = self.base_layer
        weights: dict[str, Tensor] = {}
        if self.in_projections and not self.merged:
            weights["in_proj_weight"] = _effective(base.in_proj_weight, self.delta_weight())
        out = self.out_adapter
        if out is not None and not out.merged:
            weights["out_proj.base_layer.weight"] = _effective(out.base_layer.weight, out.delta_weight())
        if not weights:
            return base(query, key, value, *args, **kwargs)
        return functional_call(base, weights, (query, key, value, *args), kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projections={self.projections}"


def _effective(weight: Tensor, delta: Tensor) -> Tensor:
    """``W + ΔW`` in the base weight's dtype (added in float32 when the base is half precision)."""
    if weight.dtype == delta.dtype:
        return weight + delta
    return (weight.float() + delta).to(weight.dtype)
