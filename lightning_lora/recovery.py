"""What happens when ``trainer.fit(ckpt_path=...)`` meets a checkpoint that does not load.

Lightning resolves ``ckpt_path`` (``"last"`` becomes the newest ``last*.ckpt`` of the
``ModelCheckpoint`` folders) in ``Trainer.fit`` before any callback runs, then reads the file in
``_CheckpointConnector.resume_start`` — after the callbacks' ``setup``, before any state is
restored. :class:`ResumeGuard` wraps that method of one trainer, so whatever checkpoint IO
plugin reads the file:

* a file that does not load (damaged, not a Lightning checkpoint, or without the adapter
  tensors the model expects) raises :class:`~lightning_lora.CheckpointError` naming it and
  listing the checkpoints beside it that would resume, newest first — also for
  ``ckpt_path="last"``: never a silent fall-back;
* with ``fallback=True`` (opt-in) ``fit`` resumes from the newest of those instead, and the
  log says which file and why.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from lightning_lora.checkpoint_io import RESUME_FIX, is_local_path
from lightning_lora.errors import CheckpointError, describe_torch_file_problem, loadable_alternatives, sibling_files
from lightning_lora.inject import adapter_state_keys, check_adapter_state, lora_layers
from lightning_lora.io import lightning_checkpoint_problem

log = logging.getLogger(__name__)

def resume_checkpoint_problem(checkpoint: Any, pl_module: pl.LightningModule) -> Optional[str]:
    """Why ``checkpoint`` cannot resume ``pl_module``'s LoRA run (wrong kind), or None."""
    problem = lightning_checkpoint_problem(checkpoint)
    if problem is not None or not lora_layers(pl_module):
        return problem
    expected = adapter_state_keys(pl_module)
    if expected and not any(key in checkpoint["state_dict"] for key in expected):
        return (
            f"it is a Lightning checkpoint without adapter tensors: none of the {len(expected)} this model expects "
            f"(e.g. `{expected[0]}`); it was not written by a run with LoRACallback"
        )
    return None


class ResumeGuard:
    """Wraps one trainer's checkpoint read for clear errors and the opt-in fall-back (see the module docstring)."""

    def __init__(self, fallback: bool = False) -> None:
        self.fallback = fallback
        self._connector: Any = None

    def install(self, trainer: pl.Trainer) -> None:
        """Wrap ``trainer``'s checkpoint read (once; :meth:`remove` undoes it)."""
        connector = trainer._checkpoint_connector
        if "resume_start" in vars(connector):
            return
        original = connector.resume_start
        connector.resume_start = partial(self._resume_start, trainer, original)
        self._connector = connector

    def remove(self) -> None:
        if self._connector is not None:
            vars(self._connector).pop("resume_start", None)
            self._connector = None

    def _resume_start(
        self, trainer: pl.Trainer, original: Callable[..., None], checkpoint_path: Any = None, weights_only: Any = None
    ) -> None:
        if not checkpoint_path or not is_local_path(checkpoint_path) or not Path(checkpoint_path).is_file():
            return original(checkpoint_path, weights_only=weights_only)  # nothing, remote, a folder or missing
        pl_module = trainer.lightning_module
        cause: Optional[BaseException] = None
        try:
            original(checkpoint_path, weights_only=weights_only)
        except CheckpointError as err:
            problem, cause = err.problem, err
        except Exception as err:  # noqa: BLE001 - any failure to read is reported with the file's name
            problem, cause = self._diagnose(trainer, checkpoint_path, err), err
        else:
            problem = resume_checkpoint_problem(trainer._checkpoint_connector._loaded_checkpoint, pl_module)
            if problem is None:
                return None
        probe = partial(self._probe, trainer, pl_module, weights_only)
        alternatives = loadable_alternatives(sibling_files(checkpoint_path), probe, exclude=checkpoint_path)
        error = CheckpointError(checkpoint_path, problem, RESUME_FIX, alternatives)
        if not (self.fallback and alternatives and trainer.state.fn == TrainerFn.FITTING):
            trainer._checkpoint_connector._loaded_checkpoint = {}
            raise error from cause
        chosen = alternatives[0][0]
        log.warning(
            "Resuming from %s (%s), the newest checkpoint beside it that loads, instead of %s: %s "
            "(resume_fallback=True).",
            chosen,
            alternatives[0][1],
            checkpoint_path,
            problem,
        )
        return original(str(chosen), weights_only=weights_only)

    @staticmethod
    def _diagnose(trainer: pl.Trainer, path: Any, error: BaseException) -> str:
        """What is wrong with ``path``, which the trainer's checkpoint IO (not AtomicCheckpointIO) failed to read."""
        io = trainer.strategy.checkpoint_io
        reader = getattr(io, "checkpoint_io", None) or io  # a wrapper such as AsyncCheckpointIO reads with its base
        if not isinstance(reader, TorchCheckpointIO):
            return f"{type(reader).__name__} could not read it ({type(error).__name__}: {error})"
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as load_error:  # noqa: BLE001
            return describe_torch_file_problem(path, load_error)
        problem = resume_checkpoint_problem(checkpoint, trainer.lightning_module)
        return problem or f"it loads, but resuming from it failed ({type(error).__name__}: {error})"

    @staticmethod
    def _probe(trainer: pl.Trainer, pl_module: pl.LightningModule, weights_only: Any, path: Path) -> str:
        """Read ``path`` as the resume would and check it fits the model; raise if it would not resume."""
        io = trainer.strategy.checkpoint_io
        if isinstance(getattr(io, "checkpoint_io", None) or io, TorchCheckpointIO):  # also AtomicCheckpointIO
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        else:
            checkpoint = trainer.strategy.load_checkpoint(path, weights_only=weights_only)
        problem = resume_checkpoint_problem(checkpoint, pl_module)
        if problem is not None:
            raise ValueError(problem)
        if lora_layers(pl_module):
            check_adapter_state(pl_module, checkpoint["state_dict"], str(path))
        return f"step {checkpoint['global_step']}" if "global_step" in checkpoint else ""
