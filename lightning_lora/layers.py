"""LoRA layer types: a frozen base layer plus a trainable low-rank update.

Every layer computes ``h = base(x) + s · B(A(dropout(x)))`` (Hu et al. 2021, eq. 3) with
``s = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA). The update is applied as two thin
matrix products, ``x @ Aᵀ @ Bᵀ``, never by materialising ``B A`` in the forward pass.
Merging folds ``ΔW = s · B A`` into the base weight once, so a merged model has no extra
inference latency; :meth:`LoRALayer.unmerge` subtracts the same ΔW again.

Parameter names follow PEFT (``base_layer``, ``lora_A.weight``, ``lora_B.weight``,
``lora_embedding_A``, ``lora_embedding_B``) so state-dict keys map one-to-one onto PEFT's
adapter files.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.fused import fusable, lora_dense
from lightning_lora.quantize import compute_dtype_of, dequantize_linear, is_4bit_linear, keep_training_format

log = logging.getLogger(__name__)


class LoRAWeight(nn.Module):
    """One factor (A or B) of a dense LoRA update: a bare ``weight`` applied as ``x @ weightᵀ``.

    Deliberately *not* an ``nn.Linear``: tools that replace every ``nn.Linear`` in a model
    (Lightning's ``BitsandbytesPrecision``, ``torch.ao`` dynamic quantization, FSDP/DeepSpeed
    policies keyed on ``nn.Linear``) must never quantize or re-wrap an adapter.
    """

    def __init__(self, out_features: int, in_features: int, dtype: Optional[torch.dtype] = None, device: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}"


class LoRALayer(nn.Module):
    """Base class: wraps ``base_layer`` and owns the rank-``r`` update around it.

    Subclasses create the adapter parameters and implement :meth:`lora_forward` (the
    update for an input) and :meth:`delta_weight` (ΔW in the base weight's layout).

    The adapter keeps ``adapter_dtype`` whatever the model is cast to afterwards
    (``model.to(torch.bfloat16)``, Lightning's ``"bf16-true"``), so small updates are not
    lost to bf16 rounding; device moves apply as usual.
    """

    #: Names of this layer's own trainable tensors, relative to the layer.
    adapter_parameter_names: tuple[str, ...] = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_dtype = adapter_dtype
        self.merged = False

    # -- what subclasses provide -------------------------------------------------------
    def lora_forward(self, x: Tensor) -> Tensor:
        """The update ``s · B A x`` for input ``x`` (in the adapter's dtype)."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """ΔW = s · B A in float32, shaped like ``base_layer.weight``."""
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight, for code that reads ``module.weight`` (e.g. its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias."""
        return self.base_layer.bias

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's own parameters as ``(name relative to this layer, parameter)``."""
        for name, param in self.named_parameters():
            if name in self.adapter_parameter_names:
                yield name, param

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        return result + self.lora_forward(x).to(result.dtype)

    def _adapter_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        # `.to` returns `x` itself when the dtype already matches: no copy in fp32.
        return self.lora_dropout(x.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (computed in float32, cast back). Idempotent."""
        if self.merged:
            return
        weight = self._mergeable_base_weight()
        weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again, restoring it up to float rounding."""
        if not self.merged:
            return
        weight = self._mergeable_base_weight()
        weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def _mergeable_base_weight(self) -> Tensor:
        if is_4bit_linear(self.base_layer):
            # QLoRA: merge into a float32 copy of the 4-bit weight; the result stays full precision.
            self.base_layer = dequantize_linear(self.base_layer)
            log.info("Merging LoRA into a 4-bit base: dequantized it to float32 (%s); not re-quantized.", self.extra_repr())
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(
                f"Cannot merge LoRA into {type(self.base_layer).__name__}: its weight is stored as {weight.dtype} "
                "(quantized). Keep the adapters separate (merge_on_fit_end=False) or merge into an unquantized copy "
                "of the base model."
            )
        return weight

    def _apply(self, fn: Any, recurse: bool = True) -> "LoRALayer":
        if self.adapter_dtype is None:
            return super()._apply(fn, recurse)
        # Keep the tensors from before the conversion: casting `fn`'s result (e.g. bf16) back
        # to fp32 would keep the dtype but lose the adapter's precision.
        before = {
            name: (param.detach(), None if param.grad is None else param.grad.detach())
            for name, param in self.adapter_parameters()
        }
        super()._apply(fn, recurse)
        for name, param in self.adapter_parameters():
            data, grad = before[name]
            if param.dtype != self.adapter_dtype:
                param.data = data.to(device=param.device, dtype=self.adapter_dtype)
            if param.grad is not None and param.grad.dtype != self.adapter_dtype:
                source = grad if grad is not None else param.grad
                param.grad = source.to(device=param.grad.device, dtype=self.adapter_dtype)
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _init_dense_pair(lora_a: nn.Parameter, lora_b: nn.Parameter) -> None:
    # A: Kaiming-uniform as nn.Linear does (PEFT's default); B: zero, so ΔW = 0 at step 0.
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    nn.init.zeros_(lora_b)


class LoRALinear(LoRALayer):
    """LoRA around ``nn.Linear``: A is ``(r, in_features)``, B is ``(out_features, r)``."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base_layer, r, alpha, **kwargs)
        keep_training_format(base_layer)  # a 4-bit base must not switch to bitsandbytes' CPU inference layout
        in_features, out_features = self._in_out_features()
        device = base_layer.weight.device
        dtype = self.adapter_dtype or compute_dtype_of(base_layer)  # a 4-bit base's weight is packed uint8
        self.lora_A = LoRAWeight(r, in_features, dtype=dtype, device=device)
        self.lora_B = LoRAWeight(out_features, r, dtype=dtype, device=device)
        if device.type != "meta":
            _init_dense_pair(self.lora_A.weight, self.lora_B.weight)

    def _in_out_features(self) -> tuple[int, int]:
        if is_4bit_linear(self.base_layer):  # packed weight: its shape is not (out, in)
            return self.base_layer.in_features, self.base_layer.out_features
        out_features, in_features = self.base_layer.weight.shape
        return in_features, out_features

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Fast path (lightning_lora.fused): base and update in one autograd node, where that is exact.
        wt = None if self.merged or args or kwargs else self._plain_weight_t()
        a, b, bias, dropout = self.lora_A.weight, self.lora_B.weight, self.base_layer.bias, self.lora_dropout
        if (
            wt is not None
            and type(dropout) in (nn.Identity, nn.Dropout)
            and fusable(x, wt, bias, a, b, self.base_layer, self.lora_A, self.lora_B, dropout)
        ):
            x_lora = dropout(x)
            return lora_dense(x, None if x_lora is x else x_lora, wt, bias, a, b, self.scaling)
        return super().forward(x, *args, **kwargs)

    def _plain_weight_t(self) -> Optional[Tensor]:
        """The base weight as ``(in, out)`` if the base layer is exactly ``nn.Linear`` (not a subclass), else None."""
        return self.base_layer.weight.t() if type(self.base_layer) is nn.Linear else None

    def lora_forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self._adapter_input(x, self.lora_A.weight.dtype))) * self.scaling

    def delta_weight(self) -> Tensor:
        # (out, r) @ (r, in) -> (out, in), the layout of nn.Linear.weight
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


class LoRAConv1D(LoRALinear):
    """LoRA around transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``.

    A and B have the same shapes as for ``nn.Linear``; only the merge transposes ΔW
    (PEFT's ``fan_in_fan_out=True``).
    """

    def _in_out_features(self) -> tuple[int, int]:
        in_features, out_features = self.base_layer.weight.shape
        return in_features, out_features

    def _plain_weight_t(self) -> Optional[Tensor]:
        return self.base_layer.weight if type(self.base_layer) is conv1d_type() else None

    def delta_weight(self) -> Tensor:
        return super().delta_weight().T


class LoRAEmbedding(LoRALayer):
    """LoRA around ``nn.Embedding``.

    ``lora_embedding_A`` is ``(r, num_embeddings)`` and starts at zero,
    ``lora_embedding_B`` is ``(embedding_dim, r)`` and starts normal — the reverse of the
    dense layers, as in PEFT — so ΔW is again zero at step 0. Dropout does not apply: the
    inputs are token ids.
    """

    adapter_parameter_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base_layer, r, alpha, **kwargs)
        self.lora_dropout = nn.Identity()  # inputs are token ids: nothing to drop (as in PEFT)
        num_embeddings, embedding_dim = base_layer.weight.shape
        device = base_layer.weight.device
        dtype = self.adapter_dtype or base_layer.weight.dtype
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, dtype=dtype, device=device))
        if device.type != "meta":
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def lora_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        # Row lookup in Aᵀ (num_embeddings, r), with the base layer's own lookup options.
        after_a = F.embedding(
            x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return (after_a @ self.lora_embedding_B.T) * self.scaling

    def delta_weight(self) -> Tensor:
        # (embedding_dim, r) @ (r, num_embeddings) -> transpose to (num_embeddings, embedding_dim)
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


class LoRAConvNd(LoRALayer):
    """LoRA around ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (one class, the base layer's dimensionality).

    A is a convolution of the base layer's own type with its kernel, stride, padding,
    dilation and padding mode mapping ``in_channels → r``; B is a 1×…×1 convolution
    ``r → out_channels``. PEFT's layout: ``lora_A.weight`` is ``(r, in, *kernel)``,
    ``lora_B.weight`` is ``(out, r, 1, ...)``. Because B is pointwise,
    ``B(A(x)) = conv(x, ΔW)`` with ``ΔW[o, i, ...] = Σ_k B[o, k] · A[k, i, ...]``, which is
    what :meth:`delta_weight` folds into the base kernel.

    Grouped and depthwise convolutions (``groups > 1``) are rejected: their kernel sees
    only ``in_channels / groups`` inputs, which a dense A does not respect.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        conv_type = next((t for t in _CONV_TYPES if isinstance(base_layer, t)), None)
        if conv_type is None or type(self) not in (LoRAConvNd, _CONV_LORA[conv_type]):
            raise TypeError(f"{type(self).__name__} cannot wrap a {type(base_layer).__name__}; use lora_layer_class().")
        if base_layer.groups != 1:
            raise ValueError(
                f"LoRA supports nn.{conv_type.__name__} with groups=1 only; got groups={base_layer.groups} (a grouped "
                "or depthwise convolution). Exclude grouped/depthwise convolutions with `exclude_modules`."
            )
        super().__init__(base_layer, r, alpha, **kwargs)
        device = base_layer.weight.device
        dtype = self.adapter_dtype or base_layer.weight.dtype
        self.lora_A = conv_type(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
            padding_mode=base_layer.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.lora_B = conv_type(r, base_layer.out_channels, 1, bias=False, device=device, dtype=dtype)
        if device.type != "meta":
            _init_dense_pair(self.lora_A.weight, self.lora_B.weight)

    def lora_forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self._adapter_input(x, self.lora_A.weight.dtype))) * self.scaling

    def delta_weight(self) -> Tensor:
        # (out, r) contracted with (r, in, *kernel) -> (out, in, *kernel)
        b = self.lora_B.weight.float().flatten(1)
        return torch.tensordot(b, self.lora_A.weight.float(), dims=1) * self.scaling


class LoRAConv1d(LoRAConvNd):
    """LoRA around ``torch.nn.Conv1d`` (audio). Not transformers' ``Conv1D``: see :class:`LoRAConv1D`."""


class LoRAConv2d(LoRAConvNd):
    """LoRA around ``nn.Conv2d`` (images)."""


class LoRAConv3d(LoRAConvNd):
    """LoRA around ``nn.Conv3d`` (video, volumes)."""


_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_LORA: dict[type[nn.Module], type[LoRAConvNd]] = {
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Conv3d: LoRAConv3d,
}


def conv1d_type() -> Optional[type]:
    """transformers' ``Conv1D`` class if transformers is already imported, else None.

    Importing transformers takes seconds; a model that contains ``Conv1D`` has imported it
    already, so we never import it ourselves.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def lora_layer_class(module: nn.Module) -> Optional[type[LoRALayer]]:
    """The LoRA layer type that can wrap ``module``, or None if its type is unsupported."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LoRAConv1D
    if isinstance(module, nn.Linear):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    for conv_type, lora_type in _CONV_LORA.items():
        if isinstance(module, conv_type):
            return lora_type
    if isinstance(module, nn.MultiheadAttention):
        from lightning_lora.mha import LoRAMultiheadAttention  # mha builds on this module

        return LoRAMultiheadAttention
    return None


SUPPORTED_TYPES = (
    "nn.Linear",
    "transformers Conv1D",
    "nn.Embedding",
    "nn.Conv1d",
    "nn.Conv2d",
    "nn.Conv3d",
    "nn.MultiheadAttention",
)
