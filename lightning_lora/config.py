"""LoRA hyper-parameters, validated when they are created.

The names follow the LoRA paper (Hu et al. 2021, arXiv 2106.09685) and PEFT's
``LoraConfig`` so that a config can be written to and read from PEFT's
``adapter_config.json`` without renaming:

* ``r``: the rank of the update ΔW = B A (paper Section 4.1). Larger r adds capacity and
  parameters; the paper finds r as small as 1–8 enough for GPT-3 attention weights
  (Section 7.2).
* ``alpha``: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with
  ``use_rslora``, Kalajdzievski 2023), so that changing r does not require retuning the
  learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union

import torch

#: A target specification: a list of module-name suffixes, a regex (full match) or
#: the special value ``"all-linear"``.
TargetSpec = Union[str, list[str], tuple[str, ...]]

ALL_LINEAR = "all-linear"
#: The projections of ``nn.MultiheadAttention`` that can carry adapters, in packed order.
MHA_PROJECTIONS = ("q", "k", "v", "out")
_BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoRAConfig:
    """Which modules get adapters and how the adapters are shaped, scaled and trained.

    Args:
        r: Rank of each adapter (B is ``out × r``, A is ``r × in``).
        alpha: Scale numerator; the update is ``alpha / r · B A``.
        dropout: Dropout probability applied to the adapter's input only.
        target_modules: Modules to adapt. A list of names matches every module whose
            qualified name equals an entry or ends with ``.<entry>`` (``"query"`` matches
            ``encoder.layer.0.attention.self.query``); a single string is a regular
            expression that must match the whole qualified name; ``"all-linear"`` adapts
            every ``nn.Linear`` and transformers ``Conv1D`` except the output head, and
            every ``nn.MultiheadAttention`` (as selected by ``mha_projections``).
        exclude_modules: Modules never adapted, in the same syntax as ``target_modules``.
        modules_to_save: Modules trained in full and stored in adapter checkpoints (e.g. a
            freshly initialised ``classifier`` head), matched like ``target_modules`` lists.
        bias: Which biases train: ``"none"``, ``"lora_only"`` (biases of adapted modules)
            or ``"all"``.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of
            ``alpha / r``.
        adapter_dtype: Dtype the adapter weights keep even when the model is cast (e.g. by
            Lightning's ``"bf16-true"`` precision). ``None`` lets adapters follow the base
            model's dtype.
        mha_projections: For each targeted ``nn.MultiheadAttention``: which of its projections
            get adapters, out of ``"q"``, ``"k"``, ``"v"`` (slices of the packed
            ``in_proj_weight``, sharing one A as in PEFT) and ``"out"`` (``out_proj``). The
            default, all four, is PEFT's layout. See :mod:`lightning_lora.mha`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = ALL_LINEAR
    exclude_modules: Optional[TargetSpec] = None
    modules_to_save: Optional[list[str]] = None
    bias: Literal["none", "lora_only", "all"] = "none"
    use_rslora: bool = False
    adapter_dtype: Optional[Union[torch.dtype, str]] = torch.float32
    mha_projections: tuple[str, ...] = MHA_PROJECTIONS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank `r` must be a positive integer, got r={self.r!r}. Typical values are 4, 8 or 16.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(
                f"LoRA `alpha` must be a positive number, got alpha={self.alpha!r}. A common choice is alpha = 2 * r."
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA `dropout` must be in [0, 1), got dropout={self.dropout!r}. Use 0.0 to disable it.")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"`bias` must be one of {_BIAS_MODES}, got bias={self.bias!r}.")
        self.target_modules = _normalize_spec(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _normalize_spec(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = _normalize_spec(self.modules_to_save, "modules_to_save")
        self.mha_projections = _normalize_mha_projections(self.mha_projections)
        if isinstance(self.adapter_dtype, str):
            self.adapter_dtype = _parse_dtype(self.adapter_dtype)
        if self.adapter_dtype is not None and not (
            isinstance(self.adapter_dtype, torch.dtype) and self.adapter_dtype.is_floating_point
        ):
            raise TypeError(
                f"`adapter_dtype` must be a floating-point torch.dtype (e.g. torch.float32) or None, "
                f"got {self.adapter_dtype!r}."
            )

    @property
    def scaling(self) -> float:
        """The factor s in ``h = W x + s · B A x``."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON- and ``torch.load(weights_only=True)``-safe dict of this config."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("target_modules", "exclude_modules", "modules_to_save", "mha_projections"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        if out["adapter_dtype"] is not None:
            out["adapter_dtype"] = str(out["adapter_dtype"]).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        """Rebuild a config written by :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LoRA config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    def differences(self, other: "LoRAConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self_value, other_value)}``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def _normalize_spec(spec: Any, name: str) -> TargetSpec:
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"`{name}` must not be an empty string.")
        return spec
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(s, str) and s for s in spec):
            raise ValueError(f"`{name}` must be a non-empty list of module names, got {spec!r}.")
        return list(spec)
    kinds = "a list of module names" if name == "modules_to_save" else "a list of module names, a regex string"
    if name == "target_modules":
        kinds += " or 'all-linear'"
    raise TypeError(f"`{name}` must be {kinds}, got {type(spec).__name__}: {spec!r}.")


def _normalize_mha_projections(value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if (
        not isinstance(items, (list, tuple))
        or not items
        or any(p not in MHA_PROJECTIONS for p in items)
        or len(set(items)) != len(items)
    ):
        raise ValueError(
            f"`mha_projections` must be a non-empty list of distinct names out of {list(MHA_PROJECTIONS)}, "
            f"got {value!r}. E.g. ('q', 'v') adapts the query and value slices of in_proj_weight only."
        )
    return tuple(p for p in MHA_PROJECTIONS if p in items)  # canonical order, so equal configs compare equal


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"Unknown dtype name {name!r}; use e.g. 'float32', 'bfloat16' or 'float16'.")
    return dtype
