"""Run by test_ddp.py as a script: Lightning's DDP launcher re-executes it for rank 1.

Usage: python tests/ddp_fit.py OUT_DIR (full|resume)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from lora_test_modules import BertClassifier, fit_kwargs, token_loader  # noqa: E402

from lightning_lora import LoRACallback, adapter_state_dict  # noqa: E402


def main(out: Path, phase: str) -> None:
    module = BertClassifier()
    lora = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        merge_on_fit_end=False)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(
        callbacks=[lora, ckpt],
        **fit_kwargs(out, strategy="ddp", devices=2, max_steps=6),
    )
    # 48 samples, batch 4, 2 ranks: 6 batches per rank and epoch; the step-3 checkpoint is mid-epoch.
    ckpt_path = out / "ckpt" / "epoch=0-step=3.ckpt" if phase == "resume" else None
    trainer.fit(module, token_loader(n=48, batch_size=4), ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        torch.save(adapter_state_dict(module), out / f"adapters_{phase}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
