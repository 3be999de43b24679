"""Adapter files: PEFT-format export and import, adapter-only checkpoints, merged export.

PEFT's file format is the contract (``peft/utils/save_and_load.py``): a directory with
``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r), with the adapter name left out, and a ``modules_to_save`` module stored under
its own path (``base_model.model.classifier.weight``). Module paths are relative to the
Hugging Face model: inside a LightningModule that is the one ``PreTrainedModel`` it holds.

Only safetensors are read and written for adapters (no pickle), and Lightning
checkpoints are read with ``torch.load(weights_only=True)``.

Every file is written atomically and durably (:func:`~lightning_lora.checkpoint_io.atomic_write`),
and records the base-model fingerprint (:mod:`lightning_lora.fingerprint`), which loading
checks. A file that does not load raises :class:`~lightning_lora.CheckpointError` naming it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from lightning_lora.adapters import add_adapter, get_adapter_state, set_adapter_state
from lightning_lora.checkpoint_io import atomic_write_bytes, fsync_dir, load_torch_file, remove_stale_temps, temp_path_for
from lightning_lora.config import ALL_LINEAR, MHA_PROJECTIONS, LoRAConfig, TargetSpec
from lightning_lora.errors import CheckpointError, describe_safetensors_problem, loadable_alternatives, sibling_files
from lightning_lora.fingerprint import (
    FINGERPRINT_KEY,
    METADATA_KEY,
    FingerprintCheck,
    base_fingerprint,
)
from lightning_lora.fingerprint import check_base_fingerprint as _check_fingerprint
from lightning_lora.inject import (
    ModulesToSave,
    _matches,
    adapter_state_dict,
    find_lora_targets,
    find_modules_to_save,
    lora_config_of,
    lora_layers,
    unload_lora,
)
from lightning_lora.layers import LoRAConv1D, LoRALayer
from lightning_lora.mha import LoRAMultiheadAttention
from lightning_lora.quantize import dequantize_base, is_4bit_linear

PathLike = str | Path

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MERGED_WEIGHTS_NAME = "model.safetensors"
#: Top-level checkpoint key holding the LoRA config (``LoRAConfig.to_dict()``).
CHECKPOINT_CONFIG_KEY = "lora_config"
_PEFT_PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B)|modules_to_save)(\.|$)")
_REQUIRED_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")
# PEFT options we cannot reproduce, with the value that means "not used".
_UNSUPPORTED_OPTIONS = {
    "use_dora": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


# -- where the Hugging Face model sits -------------------------------------------------------
def _hf_root(model: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, module)``: the one outermost ``PreTrainedModel`` in ``model``, else ``("", model)``.

    PEFT paths are relative to the Hugging Face model; with none, or several, the paths
    are relative to ``model`` itself as for any ``nn.Module``.
    """
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None or isinstance(model, pretrained):
        return "", model
    roots: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, pretrained) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    if len(roots) != 1:
        return "", model
    return roots[0] + ".", model.get_submodule(roots[0])


def _exact_list_regex(prefix: str, names: list[str]) -> str:
    return re.escape(prefix) + "(?:" + "|".join(re.escape(n) for n in names) + ")"


# -- export -----------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's active adapter as a PEFT LoRA adapter directory.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then rebuilds the same
    adapted model. ``target_modules`` is written so that PEFT wraps exactly the modules
    adapted here: the original spec when it selects the same modules relative to the
    Hugging Face model, else the list of their full names. The safetensors metadata also
    records the base-model fingerprint (``peft`` ignores it; :func:`load_adapter` checks it).
    Both files are written atomically: a kill leaves the previous version or the new one.

    Args:
        model: A model with LoRA layers: a transformers model, a LightningModule holding
            one, or any ``nn.Module`` (paths are then relative to it).
        directory: Created if needed; ``adapter_config.json`` and
            ``adapter_model.safetensors`` are (over)written.
        base_model_name_or_path: Recorded in the config; defaults to the Hugging Face
            model's ``name_or_path`` when it has one.

    Returns:
        The directory.
    """
    config = lora_config_of(model)
    layers = lora_layers(model)
    if config is None or not layers:
        raise ValueError(f"`save_adapter`: {type(model).__name__} holds no LoRA adapters; inject or load some first.")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("`save_adapter`: the adapters are merged into the base weights; call `unmerge_lora` first.")
    prefix, root = _hf_root(model)
    outside = [n for n in layers if not n.startswith(prefix)]
    if outside:
        raise ValueError(
            f"`save_adapter`: LoRA layers {outside[:3]} lie outside the Hugging Face model `{prefix[:-1]}`; a PEFT "
            "adapter can only describe modules of that model. Target only modules inside it."
        )
    _check_peft_can_express(config, layers)
    # an adapted MHA's out_proj adapter lives inside its wrapper; PEFT finds it through the MHA target
    adapted = sorted({n[len(prefix) :] for n in layers if ".base_layer." not in n})
    saved = [n[len(prefix) :] for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    tensors: dict[str, Tensor] = {}
    for key, value in adapter_state_dict(model).items():
        if not key.startswith(prefix):
            raise ValueError(f"`save_adapter`: trained tensor `{key}` lies outside the Hugging Face model.")
        key = key[len(prefix) :]
        for wrapper in saved:  # PEFT stores a trained copy under the module's own path
            key = key.replace(f"{wrapper}.modules_to_save.", f"{wrapper}.", 1) if key.startswith(wrapper + ".") else key
        tensors[_PEFT_PREFIX + key] = value.detach().to("cpu").contiguous().clone()
    name_or_path = base_model_name_or_path or getattr(root, "name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": _peft_target_spec(root, config.target_modules, adapted, saved),
        "exclude_modules": None,
        "lora_dropout": config.dropout,
        "bias": config.bias,
        "modules_to_save": saved or None,
        "fan_in_fan_out": any(isinstance(layers[prefix + n], LoRAConv1D) for n in adapted),
        "use_rslora": config.use_rslora,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": name_or_path,
    }
    fingerprint = base_fingerprint(model, [prefix + n for n in adapted], strip_prefix=prefix)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(fingerprint, sort_keys=True)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)
    atomic_write_bytes(directory / ADAPTER_WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    atomic_write_bytes(directory / ADAPTER_CONFIG_NAME, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _check_peft_can_express(config: LoRAConfig, layers: dict[str, LoRALayer]) -> None:
    """PEFT adapts all four projections of a targeted ``nn.MultiheadAttention``; refuse fewer."""
    attention = [n for n, layer in layers.items() if isinstance(layer, LoRAMultiheadAttention)]
    if attention and tuple(config.mha_projections) != MHA_PROJECTIONS:
        raise ValueError(
            f"`save_adapter`: attention modules {attention[:3]} adapt only {tuple(config.mha_projections)}, but a PEFT "
            f"adapter always adapts all of {MHA_PROJECTIONS} of a MultiheadAttention. Train with the default "
            "`mha_projections`, or keep this adapter as an adapter-only Lightning checkpoint."
        )
    if attention:
        warnings.warn(
            f"`save_adapter`: {len(attention)} MultiheadAttention adapters are written in PEFT's layout; "
            "`load_adapter` restores them exactly, but PEFT <= 0.21 applies the out_proj update twice "
            "(its MultiheadAttention merge), so PEFT's outputs for this adapter differ from ours.",
            stacklevel=3,
        )


def _peft_target_spec(root: nn.Module, spec: TargetSpec, adapted: list[str], saved: list[str]) -> TargetSpec:
    """``spec`` if it selects exactly ``adapted`` among ``root``'s base modules, else their names."""
    if spec == ALL_LINEAR:
        return adapted
    inside_lora = tuple(f"{n}." for n, m in root.named_modules() if isinstance(m, (LoRALayer, ModulesToSave)))
    skip = tuple(f"{n}." for n in saved)
    candidates = [n for n, _ in root.named_modules() if n and not n.startswith(inside_lora) and not n.startswith(skip)]
    selected = sorted(n for n in candidates if n not in saved and _matches(n, spec))
    return spec if selected == adapted else adapted


# -- import -----------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    directory: PathLike,
    adapter_name: str = "default",
    check_base_fingerprint: FingerprintCheck = "error",
) -> nn.Module:
    """Read a PEFT LoRA adapter directory (e.g. from ``PeftModel.save_pretrained``) into ``model``.

    On a model without LoRA the adapters are injected with the file's config, then its
    tensors loaded: the model then computes what ``PeftModel`` computes, with the adapter
    trainable and the base frozen (ready for inference or further training). On a model
    that already holds adapters, this one is added as ``adapter_name`` (inactive; switch
    with :func:`lightning_lora.adapters.set_active_adapter`). On an error a model that had
    no adapters keeps the freshly injected, untrained one.

    Unlike PEFT, loading is strict: a missing or extra tensor, a shape that does not fit,
    an unknown ``peft_type``, a missing config key or an option we cannot reproduce
    raises a ``ValueError`` naming the file and the key. A damaged or foreign file raises
    :class:`~lightning_lora.CheckpointError`, and so does a base model other than the one
    the adapter was trained on (its recorded fingerprint differs; ``check_base_fingerprint
    ="warn"`` only warns). Adapters written by ``peft`` carry no fingerprint and load as before.

    Returns:
        ``model`` itself.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = (
                " (pickled adapter_model.bin files are not read: convert them to safetensors)"
                if path == weights_path
                else ""
            )
            raise ValueError(f"`load_adapter`: {path} does not exist{hint}.")
    peft_config = _read_peft_config(config_path)
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in peft_config]
    if missing:
        raise ValueError(
            f"{config_path}: missing config keys {missing}; a PEFT LoRA config needs {list(_REQUIRED_CONFIG_KEYS)}."
        )
    if peft_config["peft_type"] != "LORA":
        raise ValueError(f"{config_path}: peft_type={peft_config['peft_type']!r} is not supported; only 'LORA' is.")
    for key, unused in _UNSUPPORTED_OPTIONS.items():
        if peft_config.get(key) not in (None, unused):
            raise ValueError(f"{config_path}: `{key}`={peft_config[key]!r} is not supported by lightning-lora.")
    prefix, root = _hf_root(model)
    relative = LoRAConfig(
        r=peft_config["r"],
        alpha=peft_config["lora_alpha"],
        dropout=peft_config.get("lora_dropout", 0.0),
        target_modules=peft_config["target_modules"],
        exclude_modules=peft_config.get("exclude_modules"),
        modules_to_save=peft_config.get("modules_to_save"),
        bias=peft_config.get("bias", "none"),
        use_rslora=peft_config.get("use_rslora", False),
    )
    saved = find_modules_to_save(root, relative) if relative.modules_to_save else []
    config = relative
    if prefix:  # the same modules, named from the outer model
        targets = find_lora_targets(root, relative)
        config = LoRAConfig(
            **{
                **relative.to_dict(),
                "target_modules": _exact_list_regex(prefix, targets),
                "exclude_modules": None,
                "modules_to_save": [prefix + n for n in saved] or None,
            }
        )
    file_state, metadata = _read_peft_weights(weights_path)
    fingerprint = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    _check_fingerprint(model, fingerprint, weights_path, check_base_fingerprint, add_prefix=prefix)
    state: dict[str, Tensor] = {}
    for key, value in file_state.items():
        key = key[len(_PEFT_PREFIX) :]
        for wrapper in saved:  # `classifier.weight` (or older PEFT's `classifier.modules_to_save.weight`)
            if key.startswith(wrapper + ".") and not key.startswith(f"{wrapper}.modules_to_save."):
                key = f"{wrapper}.modules_to_save.{key[len(wrapper) + 1 :]}"
        state[prefix + key] = value
    add_adapter(model, adapter_name, config)  # injects on a model without LoRA, else adds inactive
    _load_strict(model, adapter_name, state, str(weights_path))
    return model


def load_adapter_checkpoint(
    model: nn.Module,
    ckpt_path: PathLike,
    adapter_name: str = "default",
    check_base_fingerprint: FingerprintCheck = "error",
) -> nn.Module:
    """Rebuild the adapters of an adapter-only Lightning checkpoint written with :class:`LoRACallback`.

    ``model`` is the LightningModule the checkpoint was trained on, without LoRA (the
    adapters are injected with the checkpoint's config) or already holding adapters (this
    one is added as ``adapter_name``). The checkpoint is read with ``weights_only=True``
    and must hold exactly the adapter tensors the config implies.

    A damaged file, a file that is not a Lightning checkpoint, a checkpoint without LoRA
    adapters, and a base model other than the one the checkpoint was trained on (its
    fingerprint differs; ``check_base_fingerprint="warn"`` only warns) raise
    :class:`~lightning_lora.CheckpointError`, before ``model`` is changed.

    Returns:
        ``model`` itself, ready for inference or further training.
    """
    checkpoint = load_torch_file(
        ckpt_path, _ADAPTER_CHECKPOINT_FIX, probe=probe_adapter_checkpoint, map_location="cpu", weights_only=True
    )
    problem = adapter_checkpoint_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(
            ckpt_path,
            problem,
            _ADAPTER_CHECKPOINT_FIX,
            loadable_alternatives(sibling_files(ckpt_path), probe_adapter_checkpoint, ckpt_path),
        )
    _check_fingerprint(model, checkpoint.get(FINGERPRINT_KEY), ckpt_path, check_base_fingerprint)
    config = LoRAConfig.from_dict(checkpoint[CHECKPOINT_CONFIG_KEY])
    add_adapter(model, adapter_name, config)  # injects on a model without LoRA, else adds inactive
    _load_strict(model, adapter_name, checkpoint["state_dict"], str(ckpt_path))
    return model


_ADAPTER_CHECKPOINT_FIX = (
    "Pass an adapter-only checkpoint written by a run with LoRACallback (for example another one listed below); "
    "full checkpoints load with `LightningModule.load_from_checkpoint`"
)


def lightning_checkpoint_problem(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` (a loaded object) is not a Lightning checkpoint, or None when it is one."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with a `state_dict`)"
    if not isinstance(checkpoint.get("state_dict"), dict):
        keys = ", ".join(map(str, list(checkpoint)[:5])) + (", ..." if len(checkpoint) > 5 else "")
        return f"it is not a Lightning checkpoint: it has no `state_dict` entry (its keys: {keys or 'none'})"
    return None


def adapter_checkpoint_problem(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` is not an adapter-only checkpoint of :class:`LoRACallback`, or None when it is one."""
    problem = lightning_checkpoint_problem(checkpoint)
    if problem is not None:
        return problem
    if CHECKPOINT_CONFIG_KEY not in checkpoint:
        return (
            f"it is a Lightning checkpoint without LoRA adapters (no `{CHECKPOINT_CONFIG_KEY}` entry: it was not "
            "written by a run with LoRACallback)"
        )
    if not any(_ADAPTER_KEY.search(key) for key in checkpoint["state_dict"]):
        return "it is a LoRA checkpoint whose `state_dict` holds no adapter tensors"
    return None


def probe_adapter_checkpoint(path: Path) -> str:
    """Read ``path`` as :func:`load_adapter_checkpoint` would (memory-mapped); raise if it would fail.

    Returns:
        A short description for listings, e.g. ``"step 12"``.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    problem = adapter_checkpoint_problem(checkpoint)
    if problem is not None:
        raise ValueError(problem)
    return f"step {checkpoint['global_step']}" if "global_step" in checkpoint else ""


def _read_peft_config(config_path: Path) -> dict[str, Any]:
    try:
        peft_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            config_path,
            f"it is not valid JSON ({err})",
            "Write the adapter again (save_adapter or PeftModel.save_pretrained), or use another adapter folder",
            _other_adapter_dirs(config_path.parent),
            searched=config_path.parent.parent,
        ) from err
    if not isinstance(peft_config, dict):
        raise CheckpointError(
            config_path, "it is not a JSON object", "Use the adapter_config.json written with the adapter", listed=False
        )
    return peft_config


def _read_peft_weights(weights_path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and ``__metadata__`` of a PEFT adapter file; :class:`CheckpointError` if it is damaged or foreign."""
    fix = "Write the adapter again (save_adapter or PeftModel.save_pretrained), or use another adapter folder"
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        problem = describe_safetensors_problem(weights_path) or f"it does not load ({type(err).__name__}: {err})"
        raise CheckpointError(
            weights_path, problem, fix, _other_adapter_dirs(weights_path.parent), searched=weights_path.parent.parent
        ) from err
    foreign = [key for key in tensors if not key.startswith(_PEFT_PREFIX)]
    if foreign or not tensors:
        problem = (
            f"it is not a PEFT LoRA adapter: key `{foreign[0]}` does not start with `{_PEFT_PREFIX}`"
            if foreign
            else "it holds no tensors, so no adapter"
        )
        raise CheckpointError(
            weights_path, problem, fix, _other_adapter_dirs(weights_path.parent), searched=weights_path.parent.parent
        )
    return tensors, metadata


def _other_adapter_dirs(directory: Path) -> list[tuple[Path, str]]:
    """Adapter folders beside ``directory`` whose weights load, newest first (their weights files)."""
    try:
        candidates = [d / ADAPTER_WEIGHTS_NAME for d in directory.parent.iterdir() if d.is_dir() and d != directory]
    except OSError:
        return []

    def probe(path: Path) -> str:
        if describe_safetensors_problem(path) is not None:
            raise ValueError(path)
        with safe_open(str(path), framework="pt") as f:
            return f"{len(list(f.keys()))} tensors"

    return loadable_alternatives(candidates, probe)


def _load_strict(model: nn.Module, adapter_name: str, state: dict[str, Tensor], source: str) -> None:
    expected = get_adapter_state(model, adapter_name)
    problems = [f"missing `{k}` (model shape {tuple(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [
        f"unexpected `{k}` (shape {tuple(v.shape)}): the model has no such adapter tensor"
        for k, v in state.items()
        if k not in expected
    ]
    problems += [
        f"`{k}` has shape {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{source} does not fit {type(model).__name__} ({len(problems)} problems):\n  {shown}")
    set_adapter_state(model, adapter_name, state, source)


# -- merged export ------------------------------------------------------------------------------
def save_merged(model: nn.Module, directory: PathLike, tokenizer: Any = None) -> Path:
    """Save the model with its active adapter merged in, as a plain model that needs no lightning-lora.

    ``model`` is left unchanged: the merge happens on a copy (of the Hugging Face model
    only, when there is one, so plan memory for a second copy of it). ΔW is added in
    float32 and cast back to each weight's dtype. A transformers model (or the one inside
    a LightningModule) is written with ``save_pretrained`` as safetensors, so
    ``AutoModel...from_pretrained(directory)`` loads it; any other module is written as
    ``model.safetensors`` holding its merged ``state_dict``.

    Files are written into a temporary folder beside ``directory``, fsync'ed, then each is
    renamed into ``directory``: a kill leaves every file either old or new, never partial.

    Args:
        tokenizer: Saved into the same directory with its ``save_pretrained`` when given.

    Returns:
        The directory.
    """
    if not lora_layers(model):
        raise ValueError(f"`save_merged`: {type(model).__name__} holds no LoRA adapters; nothing to merge.")
    directory = Path(directory)
    prefix, root = _hf_root(model)
    if hasattr(root, "save_pretrained"):
        if len(lora_layers(root)) != len(lora_layers(model)):
            raise ValueError(
                f"`save_merged`: some LoRA layers lie outside the Hugging Face model `{prefix[:-1]}` and would be lost."
            )
        merged = copy.deepcopy(root)
        unload_lora(merged, merge=True)
        dequantize_base(merged)  # a QLoRA export is full precision, never silently re-quantized
        _write_folder_atomically(directory, lambda staging: _save_pretrained(merged, tokenizer, staging))
    else:
        if any(is_4bit_linear(m) for m in model.modules()):
            merged = copy.deepcopy(model)
            unload_lora(merged, merge=True)
            dequantize_base(merged)
            state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        else:
            state = _merged_state_dict(model)
        data = safetensors_bytes(state, metadata={"format": "pt"})
        _write_folder_atomically(directory, lambda staging: _save_pretrained(None, tokenizer, staging, data))
    return directory


def _save_pretrained(model: Any, tokenizer: Any, folder: Path, merged_bytes: bytes | None = None) -> None:
    if model is not None:
        model.save_pretrained(str(folder))
    if merged_bytes is not None:
        (folder / MERGED_WEIGHTS_NAME).write_bytes(merged_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _write_folder_atomically(directory: Path, write: Any) -> None:
    """``write(staging)`` fills a temporary folder beside ``directory``; its files are fsync'ed and
    renamed into ``directory`` one by one (each rename atomic), then both folders are fsync'ed."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory.parent)
    staging = temp_path_for(directory)
    staging.mkdir()
    try:
        write(staging)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in files:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        for path in files:
            target = directory / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        for folder in {(directory / p.relative_to(staging)).parent for p in files}:
            fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@torch.no_grad()
def _merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict ``unload_lora(model, merge=True)`` would give, computed without touching ``model``."""
    out: dict[str, Tensor] = {}
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALayer, ModulesToSave))}
    for key, value in model.state_dict().items():
        owner = next((n for n in wrappers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value.contiguous().clone()
            continue
        wrapper, rest = wrappers[owner], key[len(owner) + 1 :]
        if isinstance(wrapper, ModulesToSave):
            if rest.startswith("modules_to_save."):
                out[f"{owner}.{rest[len('modules_to_save.') :]}"] = value.contiguous().clone()
        elif rest == "base_layer.weight" and not wrapper.merged:
            out[f"{owner}.weight"] = (value.float() + wrapper.delta_weight().to(value.device)).to(value.dtype)
        elif rest.startswith("base_layer."):
            out[f"{owner}.{rest[len('base_layer.') :]}"] = value.contiguous().clone()
    return out
