"""Several named adapters on one frozen base model, switched at run time.

The LoRA paper's task switching (Hu et al. 2021, Section 4.2): one base model, many small
adapters, swapped by exchanging only A and B. Exactly one adapter (or none) is *active*
and lives in the model's LoRA layers as after :func:`~lightning_lora.inject_lora`, so
``LoRACallback``, checkpoints, :func:`~lightning_lora.merge_lora` and
:func:`~lightning_lora.adapter_state_dict` see an ordinary single-adapter model. The
inactive adapters wait in a bank attribute on the model (their config plus detached
tensors), which is not part of ``state_dict``: Lightning checkpoints hold the active
adapter only; write the others with :func:`get_adapter_state` or the PEFT export.

Switching saves the live tensors of the active adapter into the bank (training progress
is kept) and installs the other one: into the same ``Parameter`` objects when both
configs are equal (an optimizer built over them stays valid), otherwise by unloading and
injecting the other config (new parameters; build the optimizer after switching). A
merged active adapter is unmerged before it is saved or replaced; merge again after
switching for latency-free inference.

The adapter created by plain ``inject_lora`` or ``LoRACallback`` is called ``"default"``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_lora.config import LoRAConfig
from lightning_lora.inject import (
    CONFIG_ATTR,
    ModulesToSave,
    _replace,
    adapter_state_dict,
    adapter_state_keys,
    inject_lora,
    lora_config_of,
    lora_layers,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.layers import LoRALayer

log = logging.getLogger(__name__)

#: Name of the adapter that plain ``inject_lora`` / ``LoRACallback`` creates.
DEFAULT_ADAPTER = "default"
#: Attribute (outside ``state_dict``) holding a model's :class:`_AdapterBank`.
BANK_ATTR = "_lora_adapters"
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ADAPTER_KEY = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B)|modules_to_save)(\.|$)")


@dataclass
class _Adapter:
    config: LoRAConfig
    state: dict[str, Tensor] | None  # None while active: its tensors live in the model


@dataclass
class _AdapterBank:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: str | None = None


# -- public API ----------------------------------------------------------------------------
def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> nn.Module:
    """Add a freshly initialised adapter called ``name``.

    On a model without LoRA layers this is ``inject_lora(model, config)`` and ``name``
    becomes the active adapter. On a model that has an active adapter the new one is
    stored inactive (activate it with :func:`set_active_adapter`); the active adapter
    and its parameters are left as they are.

    Several adapters need ``bias="none"`` and no parameters unfrozen outside LoRA: those
    tensors belong to the base model, which every adapter shares.

    Returns:
        ``model`` itself.
    """
    _check_name(name)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"`config` must be a LoRAConfig, got {type(config).__name__}: {config!r}.")
    bank = _bank(model)
    if name in bank.adapters:
        raise ValueError(f"An adapter called {name!r} already exists; known adapters: {list(bank.adapters)}.")
    if bank.active is None:
        inject_lora(model, config)
        bank.adapters[name] = _Adapter(config, None)
        bank.active = name
        return model
    _check_shareable(model, bank.adapters[bank.active].config, bank.active, config, name)
    unmerge_lora(model)
    bank.adapters[name] = _Adapter(config, _fresh_state(model, config))
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; outputs then equal a model that only has ``name``.

    The adapter active so far keeps its current (trained) values in the bank. A merged
    active adapter is unmerged first.
    """
    bank = _bank(model)
    target = _get(bank, name)
    if bank.active == name:
        return
    assert target.state is not None  # inactive adapters always hold their tensors
    if bank.active is None:
        inject_lora(model, target.config)
    else:
        current = bank.adapters[bank.active]
        unmerge_lora(model)
        current.state = _snapshot(model)
        if current.config.to_dict() == target.config.to_dict():
            object.__setattr__(model, CONFIG_ATTR, target.config)  # same layers, the other adapter's config
        else:
            unload_lora(model)
            inject_lora(model, target.config)
    _copy_into_model(model, target.state)
    target.state = None
    bank.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``.

    Deleting the active adapter unloads it (unmerged): the original model comes back and
    no adapter is active until :func:`set_active_adapter` installs one of the rest.
    """
    bank = _bank(model)
    _get(bank, name)
    if bank.active == name:
        unload_lora(model)
        bank.active = None
    del bank.adapters[name]


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter, or None."""
    return _bank(model).active


def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters, active or not, in the order they were added."""
    return list(_bank(model).adapters)


def get_adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors, keyed as :func:`adapter_state_dict` would key them were it active.

    For the active adapter this is ``adapter_state_dict(model)`` (sharing storage with the
    live parameters); for an inactive one, a copy of the stored tensors.
    """
    bank = _bank(model)
    adapter = _get(bank, name)
    if adapter.state is None:
        return adapter_state_dict(model)
    return {key: value.clone() for key, value in adapter.state.items()}


def get_adapter_config(model: nn.Module, name: str) -> LoRAConfig:
    """The :class:`LoRAConfig` adapter ``name`` was added with."""
    return _get(_bank(model), name).config


@torch.no_grad()
def set_adapter_state(model: nn.Module, name: str, state: dict[str, Tensor], source: str = "state") -> None:
    """Overwrite adapter ``name``'s tensors with ``state`` (cast to the adapter's dtypes).

    Strict: a missing key, a key the adapter does not have or a shape mismatch raises a
    ``ValueError`` naming each key and both shapes, and nothing is written.
    """
    bank = _bank(model)
    adapter = _get(bank, name)
    if adapter.state is None:
        current = adapter_state_dict(model)
        _check_state({k: tuple(v.shape) for k, v in current.items()}, state, name, source)
        _copy_into_model(model, state)
    else:
        _check_state({k: tuple(v.shape) for k, v in adapter.state.items()}, state, name, source)
        for key, value in adapter.state.items():
            value.copy_(state[key])


# -- internals -----------------------------------------------------------------------------
def _bank(model: nn.Module) -> _AdapterBank:
    """The model's bank, created on first use and reconciled with its LoRA layers."""
    bank = model.__dict__.get(BANK_ATTR)
    if bank is None:
        bank = _AdapterBank()
        object.__setattr__(model, BANK_ATTR, bank)
    config = lora_config_of(model)
    if bank.active is not None and bank.adapters[bank.active].config is not config:
        # unload_lora / merge_lora(unload=True) / a new inject_lora ran outside this module.
        log.warning("Adapter %r was unloaded outside `lightning_lora.adapters`; forgetting it.", bank.active)
        del bank.adapters[bank.active]
        bank.active = None
    if config is not None and bank.active is None:
        if DEFAULT_ADAPTER in bank.adapters:
            raise ValueError(
                f"{type(model).__name__} holds LoRA layers injected outside `lightning_lora.adapters`, but an "
                f"inactive adapter is already called {DEFAULT_ADAPTER!r}. Unload them, then use `add_adapter`."
            )
        bank.adapters[DEFAULT_ADAPTER] = _Adapter(config, None)
        bank.active = DEFAULT_ADAPTER
    return bank


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use letters, digits, '_' and '-' only (it becomes part of file "
            "and key names)."
        )


def _get(bank: _AdapterBank, name: str) -> _Adapter:
    if name not in bank.adapters:
        raise KeyError(f"No adapter called {name!r}; known adapters: {list(bank.adapters) or '(none)'}.")
    return bank.adapters[name]


def _check_shareable(model: nn.Module, active: LoRAConfig, active_name: str, new: LoRAConfig, new_name: str) -> None:
    for config, name in ((active, active_name), (new, new_name)):
        if config.bias != "none":
            raise ValueError(
                f"Adapter {name!r} trains biases (bias={config.bias!r}), but biases belong to the base model that "
                "all adapters share. Use bias='none' for several adapters on one base."
            )
    shared = [key for key in adapter_state_keys(model) if not _ADAPTER_KEY.search(key)]
    if shared:
        raise ValueError(
            f"Adapter {active_name!r} trains base-model parameters that every adapter would share: "
            f"{shared[:5]}{' ...' if len(shared) > 5 else ''}. Freeze them before adding adapter {new_name!r}."
        )


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}


@torch.no_grad()
def _copy_into_model(model: nn.Module, state: dict[str, Tensor]) -> None:
    live = model.state_dict(keep_vars=True)
    for key, value in state.items():
        live[key].copy_(value)


def _check_state(expected: dict[str, tuple[int, ...]], state: dict[str, Tensor], name: str, source: str) -> None:
    problems = [f"missing `{key}` (adapter shape {shape})" for key, shape in expected.items() if key not in state]
    problems += [
        f"`{key}` has shape {tuple(state[key].shape)} in the {source} but {shape} in adapter {name!r}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    problems += [
        f"unexpected `{key}` (shape {tuple(value.shape)}): adapter {name!r} has no such tensor"
        for key, value in state.items()
        if key not in expected
    ]
    if problems:
        raise ValueError(
            f"The {source} does not fit adapter {name!r} ({len(problems)} problems):\n  " + "\n  ".join(problems[:20])
        )


def _fresh_state(model: nn.Module, config: LoRAConfig) -> dict[str, Tensor]:
    """The tensors ``inject_lora(model, config)`` would create, leaving ``model``'s adapter in place.

    Takes the current wrappers out, injects ``config`` on the bare base, copies the fresh
    tensors and puts the very same wrapper objects back (same parameters, flags, hooks).
    """
    config_before = lora_config_of(model)
    wrappers = [
        (path, module)
        for path, module in model.named_modules(remove_duplicate=False)
        if path and isinstance(module, (LoRALayer, ModulesToSave))
    ]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    unload_lora(model)
    try:
        inject_lora(model, config)
        state = _snapshot(model)
        unload_lora(model)
    finally:
        if lora_layers(model):  # inject_lora succeeded but copying failed
            unload_lora(model)
        for path, module in wrappers:
            _replace(model, path, module)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        object.__setattr__(model, CONFIG_ATTR, config_before)
    return state
