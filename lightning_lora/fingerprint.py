"""Base-model fingerprint: which frozen weights an adapter was trained on, cheap enough to record on every save.

An adapter only makes sense on the base weights it was trained against. Files record at most
the base model's *name*, so an adapter loaded onto another checkpoint of the same
architecture (a re-trained base, another fine-tune) loads without complaint and computes
nonsense. Every adapter-only checkpoint (``checkpoint["lora_base_fingerprint"]``) and every
PEFT adapter file we write (safetensors ``__metadata__["lightning_lora.base_fingerprint"]``,
which ``peft`` ignores) records :func:`base_fingerprint`; loading compares it with the model's.

What it covers: for each adapted module, the shape and a fixed sample of
:data:`SAMPLES_PER_MODULE` values of each of its base *weights* (``weight``,
``in_proj_weight``, ...; biases are left out because ``bias="all"`` trains them). The sample
positions are ``i * 2654435761 mod numel``, spread over rows and columns; the values are
rounded to bfloat16 and hashed (SHA-256, 16 hex digits kept per module). It detects a
different base (another seed, a re-trained or further fine-tuned model, a different layer)
unless the two bases agree on every sampled value; a change confined to unsampled entries of
a large matrix can pass.

Where it is the same: on every device (the sampled values are copied to the CPU bit for
bit), and for float32, bfloat16 and float64 copies of one set of weights (a bfloat16 copy
*is* the float32 values rounded to bfloat16, as here). float16 copies round differently and
get their own class; weights stored quantized (bitsandbytes 4/8-bit), on the ``meta``
device or sharded (DTensor), and layers whose adapter is merged in, are not fingerprinted. Modules whose classes differ between
file and model are not compared; the log says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_lora.errors import CheckpointError
from lightning_lora.layers import LoRALayer

log = logging.getLogger(__name__)

#: Checkpoint key and safetensors ``__metadata__`` key holding the fingerprint.
FINGERPRINT_KEY = "lora_base_fingerprint"
METADATA_KEY = "lightning_lora.base_fingerprint"
FINGERPRINT_VERSION = 1
SAMPLES_PER_MODULE = 1024
_STRIDE = 2654435761  # a prime: i * _STRIDE mod numel visits distinct positions for i < numel
_NOT_COMPARABLE = ("quantized", "unavailable")

FingerprintCheck = Literal["error", "warn"]
FINGERPRINT_CHECKS: tuple[str, ...] = ("error", "warn")
_BASE_LAYER = re.compile(r"(^|\.)base_layer(?=\.|$)")


def canonical_name(name: str) -> str:
    """A module or parameter name as it is on the model without LoRA (``base_layer`` levels removed)."""
    return _BASE_LAYER.sub("", name).lstrip(".") if "base_layer" in name else name


@torch.no_grad()
def base_fingerprint(model: nn.Module, modules: Optional[Iterable[str]] = None, strip_prefix: str = "") -> dict[str, Any]:
    """The fingerprint of the base weights under ``modules`` (default: every LoRA layer of ``model``).

    Args:
        modules: Module names as on the model without LoRA (``strip_prefix`` included).
            A name that is not in ``model`` is left out.
        strip_prefix: Removed from the names recorded (e.g. the path of the Hugging Face
            model inside a LightningModule, so PEFT files name modules as ``peft`` does).

    Returns:
        ``{"version": 1, "samples": 1024, "modules": {name: "<class>:<digest>"}}``, modules in
        the model's order; ``<class>`` is ``bf16`` (float32/bfloat16/float64) or ``f16``, and a
        module that cannot be fingerprinted has ``"quantized"`` or ``"unavailable"``.
    """
    if modules is None:
        found = [(canonical_name(n), m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    else:
        wanted = set(modules)
        found = [(n, m) for n, m in _modules_by_canonical_name(model).items() if n in wanted]
    digests = {}
    for name, module in found:
        if name.startswith(strip_prefix):
            digests[name[len(strip_prefix) :]] = _module_digest(module)
    return {"version": FINGERPRINT_VERSION, "samples": SAMPLES_PER_MODULE, "modules": digests}


def check_base_fingerprint(
    model: nn.Module,
    recorded: Optional[dict[str, Any]],
    path: Union[str, Path],
    mode: FingerprintCheck = "error",
    add_prefix: str = "",
) -> None:
    """Compare the fingerprint ``recorded`` in the file at ``path`` with ``model``'s base weights.

    ``recorded`` None (files written by ``peft`` or before fingerprints existed) passes.
    A difference raises :class:`~lightning_lora.CheckpointError` naming the first differing
    module (in the model's order), or with ``mode="warn"`` logs the same as a warning.

    Args:
        add_prefix: Put in front of the recorded names to find them in ``model`` (the
            inverse of ``base_fingerprint``'s ``strip_prefix``).
    """
    if mode not in FINGERPRINT_CHECKS:
        raise ValueError(f"`check_base_fingerprint` must be one of {FINGERPRINT_CHECKS}, got {mode!r}.")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or recorded.get("version") != FINGERPRINT_VERSION:
        version = recorded.get("version") if isinstance(recorded, dict) else recorded
        log.warning("%s: base fingerprint version %r is unknown here; the base model is not checked.", path, version)
        return
    saved = {add_prefix + name: digest for name, digest in recorded["modules"].items()}
    current = base_fingerprint(model, saved, strip_prefix="")["modules"]
    differing, skipped = [], []
    for name, digest in current.items():  # the model's order
        theirs = saved[name]
        if digest.split(":")[0] != theirs.split(":")[0] or digest in _NOT_COMPARABLE or theirs in _NOT_COMPARABLE:
            skipped.append(name)
        elif digest != theirs:
            differing.append(name)
    if skipped:
        log.info(
            "%s: base fingerprint not compared for %d module(s) stored in another precision class or quantized (%s).",
            path,
            len(skipped),
            ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""),
        )
    if not differing:
        return
    first = differing[0]
    problem = (
        f"it was trained on a different base model: the weights of `{first}` differ from the ones it was trained "
        f"on (fingerprint {saved[first]} in the file, {current[first]} here; {len(differing)} of {len(current)} "
        "adapted modules differ)"
    )
    fix = (
        "Load it onto the base model it was trained on, or pass check_base_fingerprint='warn' to load it anyway "
        "(its outputs will not be what was trained)"
    )
    if mode == "error":
        raise CheckpointError(path, problem, fix, listed=False)
    warnings.warn(f"{path}: {problem}. Loading it anyway (check_base_fingerprint='warn').", UserWarning, stacklevel=2)


def _modules_by_canonical_name(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> the outermost module with that name (a LoRA layer rather than its base)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        found.setdefault(canonical_name(name), module)
    return found


def _module_digest(module: nn.Module) -> str:
    if isinstance(module, LoRALayer) and module.merged:  # the weight holds W + ΔW, not the base
        return "unavailable"
    base = module.base_layer if isinstance(module, LoRALayer) else module
    weights = sorted(
        (canonical_name(name), param)
        for name, param in base.named_parameters()
        if name.endswith("weight") and "lora_" not in name
    )
    if not weights:
        return "unavailable"
    hasher = hashlib.sha256()
    classes = set()
    for name, weight in weights:
        if not weight.is_floating_point():
            return "quantized"
        if weight.is_meta or type(weight.data) is not Tensor:
            return "unavailable"
        classes.add("f16" if weight.dtype == torch.float16 else "bf16")
        hasher.update(f"{name}:{tuple(weight.shape)};".encode())
        hasher.update(_sample(weight).view(torch.int16).numpy().tobytes())
    return f"{'f16' if 'f16' in classes else 'bf16'}:{hasher.hexdigest()[:16]}"


def _sample(weight: Tensor) -> Tensor:
    """:data:`SAMPLES_PER_MODULE` values at fixed positions (all of them for a small tensor), as CPU bfloat16."""
    numel = weight.numel()
    if numel <= SAMPLES_PER_MODULE:
        values = weight.detach().reshape(-1)
    else:
        values = torch.take(weight.detach(), _sample_index(numel, weight.device))
    return values.to(torch.bfloat16).cpu()


@functools.lru_cache(maxsize=64)
def _sample_index(numel: int, device: torch.device) -> Tensor:
    return ((torch.arange(SAMPLES_PER_MODULE, dtype=torch.int64) * _STRIDE) % numel).to(device)
