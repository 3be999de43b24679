"""QLoRA's frozen 4-bit base (Dettmers et al. 2023): bitsandbytes ``Linear4bit`` in place of ``nn.Linear``.

:func:`quantize_base` swaps the frozen ``nn.Linear`` layers of a model for
``bitsandbytes.nn.Linear4bit`` (NF4 or FP4 blocks of 64 weights, optionally with the
block scales quantized again, "double quantization"). The adapters stay in float32 and
are never quantized: they are not ``nn.Linear`` (see
:class:`~lightning_lora.layers.LoRAWeight`), and ``modules_to_save`` are skipped by name.

bitsandbytes quantizes a ``Linear4bit`` weight when the layer is moved to a device
(``layer.to("cpu")`` or ``.to("cuda")``); a layer that was only built holds its float
weight and cannot run forward yet. :func:`quantize_base` therefore quantizes right away
when given a ``device``.

The compute dtype is the dtype the 4-bit weight is dequantized to for each matmul.
On CPU it must be float32: without bf16 hardware, bf16 matmuls are ~50x slower.

Merging into a 4-bit base (:func:`dequantize_linear`) goes the other way: the weight is
dequantized to a float32 ``nn.Linear`` and ΔW is added there. Nothing is ever quantized
again implicitly; quantize the merged model yourself if you need it 4-bit.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

QuantType = Literal["nf4", "fp4"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - bitsandbytes is installed in the test environment
        raise ImportError(
            "`quantize_base` needs bitsandbytes (`pip install bitsandbytes`, version 0.45 or newer; it runs on CPU "
            "and CUDA). Without it, train the base in full precision (quantize_base=None)."
        ) from err
    return bitsandbytes


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (ours, Lightning's or one transformers loaded in 4-bit)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # a model holding Linear4bit has imported it already
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype a layer computes in: a ``Linear4bit``'s compute dtype, else its weight's dtype."""
    if is_4bit_linear(module):
        dtype = getattr(module, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32
    return module.weight.dtype


def keep_training_format(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``Linear4bit`` weights for CPU inference; returns how many layers.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode whose input needs no gradient
    (a validation step) rewrites its weight in place into a bf16 inference layout. After
    that, outputs change (bf16 compute), training forwards fail, and layers with fewer than
    64 inputs crash. A frozen base that trains again after validation must keep its
    standard layout; already repacked weights are converted back.
    """
    count = 0
    for module in model.modules():
        if not is_4bit_linear(module):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
        count += 1
    return count


def default_compute_dtype(device: Union[torch.device, str, None]) -> torch.dtype:
    """float32 on CPU (no bf16 hardware: bf16 is ~50x slower there); bf16 on GPUs that have it, else fp16."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (e.g. an ``lm_head`` tied to the embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def quantize_base(
    model: nn.Module,
    quant_type: QuantType = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    skip: Iterable[str] = (),
    device: Union[torch.device, str, None] = None,
) -> list[str]:
    """Replace the frozen ``nn.Linear`` layers of ``model`` by 4-bit ``Linear4bit`` layers, in place.

    Call it before :func:`~lightning_lora.inject_lora` (``LoRACallback(quantize_base=...)`` does,
    in ``setup``). Target layers become 4-bit bases of their LoRA layers; every other
    linear layer is frozen anyway, so it is quantized too.

    Not quantized: layers named in ``skip`` and everything inside them (the
    ``modules_to_save``, which train in full), ``nn.Linear`` subclasses (e.g. the
    ``out_proj`` of ``nn.MultiheadAttention``, whose weight is read directly), and layers whose
    weight is tied to another module (an ``lm_head`` sharing the embedding matrix).

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat, QLoRA's choice) or ``"fp4"``.
        double_quant: Quantize the per-block scales too (saves ~0.4 bit per weight).
        compute_dtype: Dtype of the matmuls; ``None`` picks :func:`default_compute_dtype` for
            ``device`` (float32 on CPU).
        skip: Qualified module names left in full precision, with everything inside them.
        device: Quantize now, on this device. ``None`` leaves the float weights in place until
            the layer is next moved with ``.to(device)``; it cannot run forward before that.

    Returns:
        The qualified names of the replaced layers.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"`quant_type` must be one of {QUANT_TYPES}, got {quant_type!r}.")
    from lightning_lora.inject import ModulesToSave, lora_layers  # inject imports layers, which imports us

    if lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} already holds LoRA layers: quantize the base before injecting adapters "
            "(LoRACallback(quantize_base=...) does this in `setup`)."
        )
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(device)
    if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"`compute_dtype` must be a floating torch.dtype (e.g. torch.float32), got {compute_dtype!r}.")
    bnb = _bnb()
    skip = list(skip)
    tied = _tied_weight_ids(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or id(module.weight) in tied:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip) or _inside_modules_to_save(model, name, ModulesToSave):
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device=torch.device("meta"),
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
            module=layer,
        )  # fmt: skip
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        layer.train(module.training)
        keep_training_format(layer)
        if device is not None:
            layer.to(device)  # bitsandbytes quantizes on the move
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
        replaced.append(name)
    if not replaced:
        raise ValueError(
            f"quantize_base found no frozen nn.Linear layer to quantize in {type(model).__name__} "
            f"(skipped: {skip or 'none'}). QLoRA quantizes nn.Linear layers only; use quantize_base=None."
        )
    log.info(
        "Quantized %d linear layers to %s%s (compute dtype %s).",
        len(replaced),
        quant_type,
        " with double quantization" if double_quant else "",
        str(compute_dtype).removeprefix("torch."),
    )
    return replaced


def _inside_modules_to_save(model: nn.Module, name: str, wrapper_type: type) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), wrapper_type) for i in range(1, len(parts)))


@torch.no_grad()
def dequantize_weight(module: nn.Module) -> Tensor:
    """A ``Linear4bit``'s weight as a float32 ``(out, in)`` tensor (its float weight if not quantized yet)."""
    keep_training_format(module)  # a repacked (CPU inference layout) weight is unpacked first
    weight = module.weight
    if getattr(weight, "quant_state", None) is None:
        return weight.data.float().clone()
    bnb = _bnb()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@torch.no_grad()
def dequantize_linear(module: nn.Module) -> nn.Linear:
    """A float32 ``nn.Linear`` with a ``Linear4bit``'s dequantized weight and bias (same device and mode)."""
    weight = dequantize_weight(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
    linear.weight.data = weight
    linear.weight.requires_grad_(False)
    if module.bias is not None:
        linear.bias.data = module.bias.data.float().clone()
        linear.bias.requires_grad_(module.bias.requires_grad)
    return linear.train(module.training)


def dequantize_base(model: nn.Module) -> list[str]:
    """Replace every ``Linear4bit`` in ``model`` by its float32 ``nn.Linear``, in place; returns their names.

    The full-precision export of a QLoRA model: after merging, layers without adapters are
    still 4-bit; this makes the whole model float32 (and says so in the log).
    """
    names = [name for name, module in model.named_modules() if name and is_4bit_linear(module)]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, dequantize_linear(getattr(parent, child_name)))
    if names:
        log.info("Dequantized %d 4-bit linear layers to float32: the model is full precision now.", len(names))
    return names


def loadable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the quantization-state entries of ``Linear4bit`` weights.

    bitsandbytes writes ``weight.absmax``, ``weight.quant_map``, ... next to a quantized
    weight but does not accept them back in ``load_state_dict``; the rest loads as is.
    """
    quant_prefixes = tuple(
        f"{name}.weight." if name else "weight." for name, module in model.named_modules() if is_4bit_linear(module)
    )
    state = model.state_dict()
    if not quant_prefixes:
        return state
    return {key: value for key, value in state.items() if not key.startswith(quant_prefixes)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of ``model``'s linear layers (4-bit ones with their quantization state)."""
    total = 0
    for module in model.modules():
        if is_4bit_linear(module):
            weight = module.weight
            total += weight.data.numel() * weight.data.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in _quant_state_tensors(state))
        elif type(module) is nn.Linear:
            total += module.weight.numel() * module.weight.element_size()
    return total


def _quant_state_tensors(state: Any) -> list[Tensor]:
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, Tensor)]


def quantize_for_fit(
    pl_module: nn.Module,
    trainer: Any,
    quant_type: Optional[QuantType],
    double_quant: bool,
    compute_dtype: Optional[torch.dtype],
    skip: list[str],
) -> None:
    """What ``LoRACallback.setup`` does to the base right before injecting adapters.

    * With Lightning's ``BitsandbytesPrecision`` plugin: the plugin would convert every
      ``nn.Linear`` only in ``strategy.setup`` (after injection), quantizing and freezing the
      ``modules_to_save`` copies too. Its ``convert_module`` runs here instead, with those
      modules ignored; the plugin later finds the layers converted and only sets their
      compute dtype.
    * With ``quant_type``: :func:`quantize_base` on the strategy's root device
      (single-device and DDP strategies only: sharded strategies would split the packed
      weights from their quantization state).
    * Every ``Linear4bit`` (also from a model loaded in 4-bit) keeps its training layout
      (:func:`keep_training_format`).
    """
    from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision as FabricBnb
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    plugin = getattr(trainer, "precision_plugin", None)
    if isinstance(plugin, FabricBnb):  # Lightning's pytorch plugin subclasses the fabric one
        if quant_type is not None:
            raise ValueError(
                f"Both LoRACallback(quantize_base={quant_type!r}) and {type(plugin).__name__} quantize the base model. "
                "Use one: the plugin (CUDA only) or quantize_base (CPU and CUDA)."
            )
        ignore = plugin.ignore_modules
        plugin.ignore_modules = set(ignore) | set(skip)
        try:
            plugin.convert_module(pl_module)
        finally:
            plugin.ignore_modules = ignore
    elif quant_type is not None:
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"quantize_base={quant_type!r} works with single-device and DDP strategies, not "
                f"{type(strategy).__name__}: sharding would split the 4-bit weights from their quantization state. "
                "Use strategy='ddp', or quantize_base=None with a sharded strategy."
            )
        device = strategy.root_device if strategy is not None else None
        quantize_base(pl_module, quant_type, double_quant, compute_dtype, skip=skip, device=device)
    keep_training_format(pl_module)
