"""Extra `lightning-lora` subcommands, one module each (registered in `lightning_lora.cli.EXTRA_COMMANDS`)."""
