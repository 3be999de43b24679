"""Run by test_multinode.py under `torchrun --nnodes 2 --nproc-per-node 1` (one process per "node").

Usage: torchrun ... tests/multinode_fit.py OUT_DIR

Lightning reads the torchrun environment (TorchElasticEnvironment); the Trainer is configured the
way a real 2-node job is: num_nodes=2, devices=1, strategy="ddp". Every rank writes its final
adapters to OUT_DIR/adapters_rank<global rank>.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from lora_test_modules import BertClassifier, fit_kwargs, token_loader  # noqa: E402

from lightning_lora import LoRACallback, adapter_state_dict  # noqa: E402


def main(out: Path) -> None:
    module = BertClassifier()
    lora = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        merge_on_fit_end=False)  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=1)
    trainer = pl.Trainer(callbacks=[lora, ckpt], **fit_kwargs(out, strategy="ddp", num_nodes=2, devices=1, max_steps=3))
    trainer.fit(module, token_loader(n=24, batch_size=4))
    assert trainer.world_size == 2 and trainer.num_nodes == 2
    torch.save(adapter_state_dict(module), out / f"adapters_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
