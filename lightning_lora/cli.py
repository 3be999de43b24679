"""The ``lightning-lora`` command: LightningCLI with LoRA options, plus extra subcommands.

``lightning-lora fit|validate|test|predict`` is a :class:`LoRACLI` (a ``LightningCLI``), so
``--config``, ``--print_config``, ``--trainer.*``, ``--ckpt_path``, ``--optimizer`` and
``--lr_scheduler`` work as in Lightning. The model and the datamodule are given by class path
(``model: class_path: lightning_lora.models.SequenceClassificationModule``) and the
:class:`~lightning_lora.LoRACallback` arguments live under ``lora:`` (``--lora.r 16``).

Other subcommands (``export``, ``inspect``, ...) are registered in :data:`EXTRA_COMMANDS` as
``"module:function"``; the function takes the remaining arguments and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any, Callable, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
import torch
from torch.optim import Optimizer

from lightning_lora.callback import LoRACallback
from lightning_lora.optim import build_optimizer

#: Extra subcommands: name -> ``"module:function"``, where ``function(argv: list[str] | None) -> int``.
EXTRA_COMMANDS: dict[str, str] = {
    "analyze": "lightning_lora.commands.analyze:main",
    "export": "lightning_lora.commands.export:main",
    "generate": "lightning_lora.commands.generate:main",
    "inspect": "lightning_lora.commands.inspect_cmd:main",
}

#: Key of the LoRACallback arguments in configs and on the command line.
LORA_KEY = "lora"

_DESCRIPTION = (
    "LoRA fine-tuning with PyTorch Lightning. Lightning subcommands: fit, validate, test, predict "
    "(options: `lightning-lora fit --help`). Extra subcommands: {extra} (`lightning-lora <name> --help`)."
)


class LoRACLI(LightningCLI):
    """``LightningCLI`` with a :class:`~lightning_lora.LoRACallback` configured under ``lora:``.

    Differences from a plain ``LightningCLI``:

    * any LightningModule / LightningDataModule can be named by ``class_path``;
    * the LoRA callback is always added to the trainer, its arguments under ``lora:``;
    * ``--optimizer``/``--lr_scheduler`` are built when Lightning calls ``configure_optimizers``
      (after the callback injected the adapters and froze the base), from the trainable
      parameters only, in the callback's param groups (``lora_A``, ``lora_B``,
      ``modules_to_save``, ``no_decay`` with weight decay 0). A plain ``LightningCLI`` builds
      them from all parameters at start-up, before any callback ran (Lightning issue 19110),
      so it would train the frozen base and miss the adapters;
    * the saved ``config.yaml`` may be overwritten (re-runs and resumes in the same folder).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", _DESCRIPTION.format(extra=", ".join(sorted(EXTRA_COMMANDS))))
        if not args:
            kwargs.setdefault("model_class", LightningModule)
            kwargs.setdefault("datamodule_class", LightningDataModule)
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Adds the :class:`LoRACallback` arguments under ``lora:``; the callback joins the trainer's callbacks."""
        parser.add_lightning_class_args(LoRACallback, LORA_KEY)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Short optimizer and scheduler names (``--optimizer AdamW``) mean ``torch.optim``'s classes.

        jsonargparse resolves a short name among every imported subclass, so once bitsandbytes
        is imported (QLoRA) ``AdamW`` or ``SGD`` would be ambiguous; torch's class is the one a
        user means unless they write a full class path.
        """
        if args is None:
            qualified = _qualify_torch_names(sys.argv[1:])
            if qualified != sys.argv[1:]:
                sys.argv[1:] = qualified
        elif isinstance(args, (list, tuple)):
            args = _qualify_torch_names(list(args))
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path`` here, before ``fit``, for the module's hyper-parameters. A file
        that does not load is left to ``fit``, where the callback raises a ``CheckpointError`` naming it,
        or resumes from the newest checkpoint beside it that loads (``--lora.resume_fallback true``)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            except Exception:  # noqa: BLE001 - reported by `fit` with the file's name
                return
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        """Print the last validation metrics (e.g. ``val/accuracy``), so a run ends with its result."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if metrics and self.trainer.is_global_zero:
            print("Validation after fit: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def _add_configure_optimizers_method_to_model(self, subcommand: Optional[str]) -> None:
        """Replaces Lightning's version: defer building ``--optimizer``/``--lr_scheduler`` until
        ``configure_optimizers`` runs, then use only the parameters that require grad then."""
        if not self.auto_configure_optimizers:
            return
        parser = self._parser(subcommand)
        optimizer_init = self._get(self.config_init, "optimizer")
        if "optimizer" not in parser._optimizers or not optimizer_init:
            return
        scheduler_init = self._get(self.config_init, "lr_scheduler") if "lr_scheduler" in parser._lr_schedulers else None
        lora = self._get(self.config_init, LORA_KEY)
        if isinstance(lora, LoRACallback) and lora.optimizer is not None:
            raise ValueError(
                "Both `--optimizer` and `--lora.optimizer` are set; keep one (`--optimizer` builds the same param groups)."
            )
        if is_overridden("configure_optimizers", self.model):
            print(
                f"Note: `{type(self.model).__name__}.configure_optimizers` is replaced by the `--optimizer` "
                "given to the CLI.",
                file=sys.stderr,
            )
        ratio = lora.lora_b_lr_ratio if isinstance(lora, LoRACallback) else 1.0
        wrap = self.configure_optimizers

        def configure_optimizers(module: LightningModule) -> Any:
            """The CLI's optimizer over the parameters that are trainable now, i.e. after LoRA injection."""
            optimizer: Optimizer = build_optimizer(module, partial(instantiate_class, init=optimizer_init), ratio)
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            return wrap(module, optimizer=optimizer, lr_scheduler=scheduler)

        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)


def _qualify_torch_names(args: list[str]) -> list[str]:
    """``--optimizer X`` / ``--lr_scheduler X`` with a bare name of a torch class → its full class path."""
    modules = {"--optimizer": torch.optim, "--lr_scheduler": torch.optim.lr_scheduler}
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in modules:
            continue
        if not eq:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        if value.isidentifier() and isinstance(getattr(modules[flag], value, None), type):
            full = f"{modules[flag].__name__}.{value}"
            if eq:
                out[i] = f"{flag}={full}"
            else:
                out[i + 1] = full
    return out


def _load_command(target: str) -> Callable[[Optional[list[str]]], int]:
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lightning-lora``: an :data:`EXTRA_COMMANDS` subcommand, or :class:`LoRACLI`.

    Returns the exit code. Errors in the user's input (``ValueError``, ``FileNotFoundError``,
    Lightning's ``MisconfigurationException``) are printed as one message instead of a traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in EXTRA_COMMANDS:
            return int(_load_command(EXTRA_COMMANDS[args[0]])(args[1:]) or 0)
        LoRACLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        print(f"lightning-lora: error: {err}", file=sys.stderr)
        return 1
    except SystemExit as exit_:  # jsonargparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


__all__ = ["EXTRA_COMMANDS", "LORA_KEY", "LoRACLI", "main"]

if __name__ == "__main__":
    sys.exit(main())
