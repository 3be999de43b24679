"""``lightning-lora export``: an adapter-only checkpoint → a PEFT adapter directory or a merged transformers model.

Examples::

    lightning-lora export --ckpt_path quickstart_output/checkpoints/last.ckpt --output_dir adapter
    lightning-lora export --ckpt_path last.ckpt --output_dir merged --format merged

The LightningModule is rebuilt from the checkpoint: its class and ``__init__`` arguments are the
ones ``lightning-lora fit`` saved (``hyper_parameters``), the base weights come from the module's
own ``from_pretrained`` and the adapters from the checkpoint (strictly: every adapter tensor must
be there with its shape). ``--model`` names the class, and ``--init_args`` overrides arguments
(e.g. a moved ``model_name_or_path``), for checkpoints written outside the CLI.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningModule

from lightning_lora.io import CHECKPOINT_CONFIG_KEY, load_adapter_checkpoint, save_adapter, save_merged
from lightning_lora.sources import resolve_model_source

FORMATS = ("peft", "merged")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-lora export", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--ckpt_path", type=str, required=True, help="adapter-only checkpoint written by LoRACallback")
    parser.add_argument("--output_dir", type=str, required=True, help="the folder to write")
    parser.add_argument("--format", type=str, default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors; merged: a plain transformers "
                             "model with the adapter folded in (plus the tokenizer)")  # fmt: skip
    parser.add_argument("--model", type=Optional[str], default=None,
                        help="LightningModule class path (default: the one saved in the checkpoint)")  # fmt: skip
    parser.add_argument("--init_args", type=Optional[dict], default=None,
                        help="__init__ arguments that replace the saved ones, e.g. '{model_name_or_path: base_dir}'")  # fmt: skip
    return parser


def rebuild_module(checkpoint: dict[str, Any], model: Optional[str], init_args: Optional[dict]) -> LightningModule:
    """The LightningModule a checkpoint was trained on, without adapters (built from its saved ``__init__`` args)."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    class_path = model or saved.get("_class_path")
    if not class_path:
        raise ValueError(
            "The checkpoint does not record its LightningModule class (it was not written by `lightning-lora fit`); "
            "pass --model package.module.ClassName and --init_args with its __init__ arguments."
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"--model {class_path!r} is not an importable class (package.module.ClassName).") from None
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"--model {class_path!r} is not a LightningModule.")
    kwargs = {k: v for k, v in saved.items() if not k.startswith("_")}
    kwargs.update(init_args or {})
    return cls(**kwargs)


def _tokenizer_of(module: LightningModule) -> Any:
    """The tokenizer of the module's base model, when it names one (saved next to a merged model)."""
    source = getattr(module, "hparams", {}).get("model_name_or_path")
    if source is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(source))
    except (OSError, ValueError):
        print(f"Note: no tokenizer found at {source!r}; the merged folder holds the model only.", file=sys.stderr)
        return None


def export(ckpt_path: str, output_dir: str, format: str = "peft", model: Optional[str] = None,
           init_args: Optional[dict] = None) -> Path:  # fmt: skip
    """Write the adapter of ``ckpt_path`` to ``output_dir`` in ``format`` (``peft`` or ``merged``); returns the folder."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {', '.join(FORMATS)}.")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist.")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if CHECKPOINT_CONFIG_KEY not in checkpoint:
        raise ValueError(f"{ckpt_path} is not an adapter-only checkpoint of LoRACallback (no `{CHECKPOINT_CONFIG_KEY}`).")
    module = load_adapter_checkpoint(rebuild_module(checkpoint, model, init_args), ckpt_path)
    if format == "peft":
        return save_adapter(module, output_dir)
    return save_merged(module, output_dir, tokenizer=_tokenizer_of(module))


def main(argv: Optional[list[str]] = None) -> int:
    """``lightning-lora export`` entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    folder = export(args.ckpt_path, args.output_dir, args.format, args.model, args.init_args)
    print(f"Exported {args.ckpt_path} as {args.format} to {folder}")
    return 0
