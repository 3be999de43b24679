"""Lightning's sharded strategies with adapter-only checkpoints.

``LoRACallback`` makes every checkpoint adapter-only by filtering ``checkpoint["state_dict"]``
in the LightningModule's ``on_save_checkpoint``. Under ``ModelParallelStrategy`` (FSDP2) and
``FSDPStrategy`` that filter also applies to *distributed* checkpoints (a folder with one
shard file per rank): only the adapter shards and the optimizer state are written, because
the strategy writes whatever ``state_dict`` the checkpoint holds.

Saving is therefore Lightning's own. Loading is not: the stock strategies load a checkpoint
into the full model (``torch.distributed.checkpoint`` requests every key of the model; the
single-file path loads strictly) before any callback hook runs, so an adapter-only
checkpoint fails there. The subclasses below only change ``load_checkpoint``: they load the
adapter tensors and the optimizer state and leave the frozen base as it is.

* :class:`LoRAModelParallelStrategy`: ``ModelParallelStrategy`` (FSDP2 ``fully_shard``,
  applied by the module in ``configure_model``; runs on CPU with gloo).
* :class:`LoRAFSDPStrategy`: ``FSDPStrategy`` (FSDP1) with ``use_orig_params=True``, which
  FSDP1 needs to flatten frozen and trainable parameters into one unit. GPU only: PyTorch's
  FSDP1 refuses to run without an accelerator ("FSDP needs a non-CPU accelerator device").

``LoRACallback`` refuses to resume from a checkpoint with the stock strategies and names the
subclass to use instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from typing_extensions import override

from lightning_lora.inject import adapter_state_keys, check_adapter_state

_LORA_SUBCLASS = {ModelParallelStrategy: "LoRAModelParallelStrategy", FSDPStrategy: "LoRAFSDPStrategy"}


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) or tensor parallelism already turned parameters into DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def check_resume_supported(strategy: Any, ckpt_path: Optional[_PATH]) -> None:
    """Raise if ``strategy`` is a stock sharded strategy that cannot load an adapter-only checkpoint."""
    if ckpt_path is None:
        return
    for stock, name in _LORA_SUBCLASS.items():
        if type(strategy) is stock:
            raise ValueError(
                f"{stock.__name__} loads checkpoints into the full model and cannot resume from LoRACallback's "
                f"adapter-only checkpoint {ckpt_path}. Use `lightning_lora.strategies.{name}` (same arguments) as the "
                "Trainer's strategy."
            )


def _checked_adapter_state(module: nn.Module, state: dict[str, Any], path: Path) -> dict[str, Any]:
    check_adapter_state(module, state, f"checkpoint {path}")
    return {key: state[key] for key in adapter_state_keys(module)}


class LoRAModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` that resumes from adapter-only checkpoints (sharded folder or single file).

    Use it exactly like ``ModelParallelStrategy``; the LightningModule applies ``fully_shard``
    in ``configure_model`` as usual. Build the model in ``__init__`` so that ``LoRACallback``
    injects the adapters *before* ``configure_model`` shards it (FSDP2 only manages the
    parameters present when ``fully_shard`` runs).
    """

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        assert self.model is not None and self.lightning_module is not None
        if not path.is_dir():  # a single file written with save_distributed_checkpoint=False
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
            adapters = _checked_adapter_state(self.lightning_module, checkpoint["state_dict"], path)
            full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
            set_model_state_dict(self.model, adapters, options=full)
            for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
                state = _rekey_optimizer_state_if_needed(state, self.model)
                set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
            checkpoint.pop("optimizer_states", None)
            return checkpoint
        model_state = get_model_state_dict(self.model)
        loaded = {"state_dict": {key: model_state[key] for key in adapter_state_keys(self.lightning_module)}}
        dcp.load(loaded, checkpoint_id=path)
        set_model_state_dict(self.model, loaded["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state[f"optimizer_{idx}"])
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["state_dict"] = loaded["state_dict"]  # for LoRACallback's adapter check
        return checkpoint


class LoRAFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) for LoRA: ``use_orig_params=True`` and resume from adapter-only checkpoints.

    FSDP1 flattens the parameters of each wrapped unit into one tensor, which must then be all
    frozen or all trainable unless ``use_orig_params=True``; a LoRA layer holds both, so that is
    the default here. Checkpoints are single files (``state_dict_type="full"``): the adapters and
    the optimizer state, gathered on rank 0. For sharded adapter checkpoints use
    :class:`LoRAModelParallelStrategy` (FSDP2), which also runs on CPU; FSDP1 needs a GPU.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_orig_params", True) is not True:
            raise ValueError(
                "LoRAFSDPStrategy needs use_orig_params=True: FSDP1 cannot flatten frozen base weights and trainable "
                "adapters into one parameter otherwise."
            )
        if kwargs.get("state_dict_type", "full") != "full":
            raise ValueError(
                f"LoRAFSDPStrategy writes adapter-only single-file checkpoints (state_dict_type='full'), got "
                f"state_dict_type={kwargs['state_dict_type']!r}. For sharded adapter checkpoints use "
                "LoRAModelParallelStrategy (FSDP2 fully_shard)."
            )
        kwargs["use_orig_params"] = True
        super().__init__(*args, **kwargs)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load the adapter tensors and the optimizer state; the frozen base stays as it is."""
        module = self.lightning_module
        assert module is not None
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(
                f"{path} is a sharded checkpoint folder; LoRAFSDPStrategy resumes from single-file checkpoints only. "
                "Resume it with LoRAModelParallelStrategy, which wrote it."
            )
        adapters = torch.load(path, map_location="cpu", weights_only=weights_only)["state_dict"]
        check_adapter_state(module, adapters, f"checkpoint {path}")
        strict = module.strict_loading
        module.strict_loading = False  # the checkpoint holds the adapters only; checked above
        try:
            checkpoint = super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict
        checkpoint["state_dict"] = adapters  # for LoRACallback's adapter check
        return checkpoint
