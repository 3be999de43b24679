"""Put LoRA into a model and take it out again, on any ``nn.Module``.

* :func:`inject_lora` finds the target modules, wraps them in LoRA layers, wraps
  ``modules_to_save`` in a trainable copy and freezes everything else.
* :func:`merge_lora` / :func:`unmerge_lora` fold ΔW into the base weights and back.
* :func:`unload_lora` restores the plain module types (merged or original weights).
* :func:`adapter_state_dict` is what a LoRA run has trained: the only tensors a LoRA
  checkpoint needs next to the unchanged base model.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from typing import Any, Optional

from torch import Tensor, nn

from lightning_lora.config import ALL_LINEAR, LoRAConfig, TargetSpec
from lightning_lora.layers import SUPPORTED_TYPES, LoRALayer, conv1d_type, lora_layer_class

log = logging.getLogger(__name__)

#: Attribute set on a model by :func:`inject_lora`, holding its :class:`LoRAConfig`.
CONFIG_ATTR = "_lora_config"
_MAX_CANDIDATES = 20


class ModulesToSave(nn.Module):
    """A module trained in full during a LoRA run (e.g. a new classification head).

    Holds the untouched ``original_module`` and a trainable copy, ``modules_to_save``,
    which the forward uses; unloading without merging gives the original back.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(True)
        self.train(module.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save(*args, **kwargs)

    @property
    def weight(self) -> Tensor:
        """The trained copy's weight, for code that reads ``module.weight``."""
        return self.modules_to_save.weight


# -- selecting modules -----------------------------------------------------------------
def _matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _inside(name: str, spec: TargetSpec) -> bool:
    """Whether ``name`` or one of its ancestors matches ``spec``."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


def _output_heads(model: nn.Module) -> set[int]:
    """ids of output layers that ``"all-linear"`` leaves alone.

    The output embedding (``lm_head``) of any Hugging Face model inside, as PEFT does.
    A model without one that is built from PyTorch's transformer blocks (``nn.Transformer``,
    ``nn.TransformerEncoder``/``Decoder`` or their layers; e.g. Lightning's demo
    ``Transformer``) has its output head found by position: its last ``nn.Linear`` when
    that lies outside every block.
    """
    heads = _hf_output_heads(model)
    if heads:
        return heads
    blocks = [n for n, m in model.named_modules() if n and isinstance(m, _TORCH_TRANSFORMER_BLOCKS)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if blocks and linears:
        name, last = linears[-1]
        if not any(name.startswith(block + ".") for block in blocks):
            log.info("all-linear: not adapting `%s`, the output head after the transformer blocks.", name)
            heads.add(id(last))
    return heads


_TORCH_TRANSFORMER_BLOCKS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _hf_output_heads(model: nn.Module) -> set[int]:
    heads = set()
    for module in model.modules():
        get_head = getattr(module, "get_output_embeddings", None)
        if callable(get_head):
            try:
                head = get_head()
            except (AttributeError, NotImplementedError):
                continue
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def _is_linear_like(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _mha_out_projs(model: nn.Module) -> dict[int, str]:
    """id of each ``nn.MultiheadAttention.out_proj`` → qualified name of its attention module."""
    return {id(m.out_proj): n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _candidate_names(model: nn.Module) -> list[str]:
    """Short names of supported modules, most frequent first, for "no match" errors."""
    counts: Counter[str] = Counter()
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if name and lora_layer_class(module) is not None:
            short = name.rsplit(".", 1)[-1]
            counts[short] += 1
            kinds.setdefault(short, type(module).__name__)
    return [f"{short} ({kinds[short]} x{n})" for short, n in counts.most_common(_MAX_CANDIDATES)]


def find_lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules ``config`` would wrap with LoRA layers.

    ``nn.MultiheadAttention`` modules are listed by their own name: selecting one (by
    name, or by ``"all-linear"``) adapts the projections in ``config.mha_projections``;
    selecting only its ``out_proj`` adapts that projection through the attention module
    (whose forward reads ``out_proj.weight`` directly), see :mod:`lightning_lora.mha`.

    Raises:
        ValueError: nothing matches (the message lists candidate names), or a matched
            module cannot be adapted.
        TypeError: a matched module's type is not supported.
    """
    return list(_select_targets(model, config))


def _select_targets(model: nn.Module, config: LoRAConfig) -> dict[str, Optional[tuple[str, ...]]]:
    """Target name → the attention projections to adapt (None for modules other than MHA)."""
    spec = config.target_modules
    heads = _output_heads(model) if spec == ALL_LINEAR else set()
    mha_out = _mha_out_projs(model)
    targets: dict[str, Optional[tuple[str, ...]]] = {}
    out_only: list[str] = []  # attention modules selected only through their out_proj
    for name, module in model.named_modules():
        if not name or isinstance(module, (LoRALayer, ModulesToSave)):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if config.modules_to_save is not None and _inside(name, config.modules_to_save):
            continue  # a module trained in full (or inside one) gets no adapter, as in PEFT
        if spec == ALL_LINEAR:
            is_attention = isinstance(module, nn.MultiheadAttention)
            if id(module) in mha_out or id(module) in heads or not (is_attention or _is_linear_like(module)):
                continue  # an out_proj is adapted through its attention module
        elif not _matches(name, spec):
            continue
        if id(module) in mha_out:
            out_only.append(mha_out[id(module)])
            continue
        if lora_layer_class(module) is None:
            raise TypeError(
                f"Target `{name}` matched by target_modules={spec!r} is a {type(module).__name__}, which LoRA "
                f"cannot adapt. Supported types: {', '.join(SUPPORTED_TYPES)}. Target its sub-layers instead, "
                f"e.g. one of: {', '.join(_candidate_names(module)) or '(none)'}."
            )
        targets[name] = config.mha_projections if isinstance(module, nn.MultiheadAttention) else None
    for name in out_only:
        if name not in targets:
            log.info("Adapting `%s.out_proj` through its nn.MultiheadAttention `%s`.", name, name)
            targets[name] = ("out",)
    for name, projections in targets.items():
        if projections is not None and "out" in projections and config.exclude_modules is not None:
            if _matches(f"{name}.out_proj", config.exclude_modules):
                kept = tuple(p for p in projections if p != "out")
                if not kept:
                    raise ValueError(
                        f"`{name}.out_proj` is excluded and mha_projections={config.mha_projections!r} selects nothing "
                        f"else of the attention module `{name}`: nothing would be adapted there. Exclude `{name}` too."
                    )
                targets[name] = kept
    if not targets:
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + (f" (after exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + ". A list entry matches a module name or its dotted suffix; a string is a full-match regex. "
            f"Candidate module names (supported types): {', '.join(_candidate_names(model)) or '(none)'}."
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(targets.items(), key=lambda item: order[item[0]]))


def find_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` selects (outermost only)."""
    if not config.modules_to_save:
        return []
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and _matches(name, config.modules_to_save) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    if not names:
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}. "
            f"Top-level children are: {', '.join(n for n, _ in model.named_children()) or '(none)'}."
        )
    return names


# -- injecting ---------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def inject_lora(model: nn.Module, config: Optional[LoRAConfig] = None, **config_kwargs: Any) -> nn.Module:
    """Wrap the targets of ``config`` in LoRA layers and freeze everything else, in place.

    Args:
        model: Any ``nn.Module`` (a LightningModule, a transformers model, ...).
        config: The LoRA settings; or pass :class:`LoRAConfig` fields as keywords.

    Returns:
        ``model`` itself, now holding LoRA layers.
    """
    if config is None:
        config = LoRAConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError(f"Pass either a LoRAConfig or its fields as keywords, not both (got {sorted(config_kwargs)}).")
    if not any(True for _ in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has no parameters to adapt. If it builds its layers in `configure_model`, "
            "inject after that hook has run (LoRACallback does this for you)."
        )
    if lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} already holds LoRA layers ({', '.join(list(lora_layers(model))[:3])}, ...). "
            "Call `unload_lora(model)` (or `merge_lora(model, unload=True)`) before injecting again."
        )
    targets = _select_targets(model, config)
    to_save = find_modules_to_save(model, config)
    layer_kwargs = dict(dropout=config.dropout, use_rslora=config.use_rslora, adapter_dtype=config.adapter_dtype)
    wrapped: dict[int, nn.Module] = {}  # a module shared at two paths gets one wrapper
    for name, projections in targets.items():
        base = model.get_submodule(name)
        if id(base) not in wrapped:
            extra = {} if projections is None else {"projections": projections}
            layer = lora_layer_class(base)(base, config.r, config.alpha, **layer_kwargs, **extra)
            wrapped[id(base)] = layer.train(base.training)  # adapters in an eval-mode model must not drop out
    # named_modules() lists a shared module once; every path to it must get the wrapper.
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in wrapped:
            _replace(model, name, wrapped[id(module)])
    for name in to_save:
        _replace(model, name, ModulesToSave(model.get_submodule(name)))
    _freeze_base(model, config)
    _disable_fused_encoder_paths(model)
    object.__setattr__(model, CONFIG_ATTR, config)
    return model


def _freeze_base(model: nn.Module, config: LoRAConfig) -> None:
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for _, param in module.adapter_parameters():
                param.requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            module.modules_to_save.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, ModulesToSave):
                module.original_module.requires_grad_(False)  # kept only to restore, never trained


def _no_op_pre_hook(module: nn.Module, args: Any) -> None:
    return None


_NESTED_ATTR = "_lora_saved_use_nested_tensor"


def _disable_fused_encoder_paths(model: nn.Module) -> None:
    # In eval mode nn.TransformerEncoderLayer runs a fused kernel that reads linear1.weight
    # etc. directly, bypassing our wrappers (adapters silently ignored). Any forward
    # pre-hook on a submodule makes it take the regular path.
    # nn.TransformerEncoder (eval, no grad, key padding mask) also turns its input into a
    # nested tensor, which LoRA layers do not support: off while adapters are in, restored
    # by unload_lora (outputs at non-padded positions are the same either way).
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and getattr(encoder, "use_nested_tensor", False):
            if any(isinstance(m, LoRALayer) for m in encoder.modules()):
                encoder.__dict__[_NESTED_ATTR] = True
                encoder.use_nested_tensor = False
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):
            for sub in layer.modules():
                if isinstance(sub, LoRALayer) and _no_op_pre_hook not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_no_op_pre_hook)


# -- merging and unloading ------------------------------------------------------------------
def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter's ΔW into its base weight (in float32, cast back).

    Args:
        unload: Also replace the LoRA wrappers by the plain base modules (and
            ``modules_to_save`` wrappers by their trained copies), leaving an ordinary
            model ready for ``save_pretrained``. Without it the wrappers stay, marked
            merged, and :func:`unmerge_lora` can undo the merge.
    """
    if unload:
        return unload_lora(model, merge=True)
    for layer in _require_lora_layers(model, "merge_lora").values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's ΔW again (original weights within float rounding)."""
    for layer in _require_lora_layers(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove all LoRA wrappers, restoring the plain module types in place.

    Args:
        merge: Keep what was trained: fold ΔW into the base weights and keep the trained
            copies of ``modules_to_save``. Otherwise the original model comes back
            (merged adapters are unmerged first, original ``modules_to_save`` restored).
    """
    for layer in _require_lora_layers(model, "unload_lora").values():
        layer.merge() if merge else layer.unmerge()
    # Every path to a shared wrapper, not only the first one named_modules() reports; inner
    # wrappers (an attention module's out_proj) before the outer one that holds them.
    for name, module in reversed(list(model.named_modules(remove_duplicate=False))):
        if name and isinstance(module, LoRALayer):
            _replace(model, name, module.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            _replace(model, name, module.modules_to_save if merge else module.original_module)
        elif module.__dict__.pop(_NESTED_ATTR, False):
            module.use_nested_tensor = True
    model.__dict__.pop(CONFIG_ATTR, None)
    return model


def _require_lora_layers(model: nn.Module, caller: str) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"`{caller}`: {type(model).__name__} holds no LoRA layers; call `inject_lora` first.")
    return layers


# -- adapter state -------------------------------------------------------------------------
def adapter_state_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of everything a LoRA run trains, in ``state_dict`` order.

    That is the adapters' A and B, the trained copies of ``modules_to_save`` (with their
    buffers) and every other parameter that requires grad (trainable biases, anything the
    user unfroze), so that nothing trained is lost from a checkpoint.
    """
    keys = {name for name, param in model.named_parameters() if param.requires_grad}
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        if isinstance(module, LoRALayer):
            keys.update(prefix + name for name, _ in module.adapter_parameters())
        elif isinstance(module, ModulesToSave):
            keys.update(f"{prefix}modules_to_save.{k}" for k in module.modules_to_save.state_dict())
    return [k for k in model.state_dict(keep_vars=True) if k in keys]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained tensors of a LoRA model (see :func:`adapter_state_keys`), detached."""
    state = model.state_dict()
    return {key: state[key] for key in adapter_state_keys(model)}


def check_adapter_state(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise if ``state`` does not hold exactly the adapter tensors ``model`` expects.

    Missing adapter tensors, adapter tensors the model does not have and shape
    mismatches each raise a ``ValueError`` naming the module and both shapes, so an
    adapter never loads partially.
    """
    model_state = model.state_dict(keep_vars=True)
    expected = adapter_state_keys(model)
    problems = []
    for key in expected:
        if key not in state:
            problems.append(f"missing `{key}` (model shape {tuple(model_state[key].shape)})")
        elif tuple(state[key].shape) != tuple(model_state[key].shape):
            problems.append(
                f"`{key}` has shape {tuple(state[key].shape)} in the {source} but {tuple(model_state[key].shape)} "
                "in the model"
            )
    expected_set = set(expected)
    is_adapter = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B)|modules_to_save)(\.|$)")
    problems += [
        f"unexpected `{key}` (shape {tuple(state[key].shape)}): no such adapter in the model"
        for key in state
        if key not in expected_set and is_adapter.search(key)
    ]
    if problems:
        shown = "\n  ".join(problems[:_MAX_CANDIDATES])
        more = f"\n  ... and {len(problems) - _MAX_CANDIDATES} more" if len(problems) > _MAX_CANDIDATES else ""
        raise ValueError(
            f"The adapter state in the {source} does not fit the model ({len(problems)} problems):\n  {shown}{more}\n"
            "Use the same LoRA settings (r, target_modules, modules_to_save, bias) and base model as the run "
            "that wrote it."
        )


def lora_config_of(model: nn.Module) -> Optional[LoRAConfig]:
    """The :class:`LoRAConfig` a model was injected with, or None."""
    return getattr(model, CONFIG_ATTR, None)
