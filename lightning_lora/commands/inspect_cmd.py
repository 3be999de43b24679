"""``lightning-lora inspect``: what a config would adapt and train, without training (a dry run).

Takes the same configuration as ``lightning-lora fit`` (``--config``, ``--model.*``, ``--lora.*``, ...),
builds the model and the :class:`~lightning_lora.LoRACallback`, and prints the adapted modules,
the trainable parameters and their share, via :meth:`LoRACallback.dry_run` (the model is left as it
is and no data is read). Example::

    lightning-lora inspect --config configs/glue/sst2.yaml --lora.r 16
"""

from __future__ import annotations

from typing import Optional

from lightning_lora.callback import LoRACallback
from lightning_lora.cli import LORA_KEY, LoRACLI
from lightning_lora.summary import LoRASummary


def inspect_config(argv: Optional[list[str]] = None) -> LoRASummary:
    """The :class:`LoRASummary` of the model and LoRA settings a fit configuration describes."""
    cli = LoRACLI(args=argv, run=False, save_config_callback=None, seed_everything_default=False,
                  parser_kwargs={"prog": "lightning-lora inspect", "description": __doc__.split("\n", 1)[0]})  # fmt: skip
    callback = cli.config_init[LORA_KEY]
    assert isinstance(callback, LoRACallback)
    return callback.dry_run(cli.model)


def main(argv: Optional[list[str]] = None) -> int:
    """``lightning-lora inspect`` entry point; returns the exit code."""
    summary = inspect_config(argv)
    print(summary)
    print("adapted modules:")
    for name, kind in summary.adapted.items():
        print(f"  {name} ({kind})")
    return 0
