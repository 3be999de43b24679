"""A LoRA training run that ``tests/test_kill_resume.py`` starts as a subprocess and SIGKILLs.

It prints one line per event so the test can pick its moment: ``batch <global_step>`` after
each training batch, ``epoch_end <epoch>``, ``save <global_step>`` right before a checkpoint is
written, ``done`` at the end. ``modules_to_save=["embed"]`` (a 20000 x 128 embedding, trained
in full, with its AdamW state) makes each checkpoint ~30 MB, so a save takes long enough to be
killed inside it.

Usage: ``PYTHONPATH=tests python tests/kill_fit.py CKPT_DIR OUT_FILE [--resume]``; the final adapter tensors
go to ``OUT_FILE`` (``torch.save``) when the run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lora_test_modules import fit_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRACallback, adapter_state_dict

MAX_STEPS = 16
EVERY_N_STEPS = 2
BATCHES_PER_EPOCH = 6


class KillModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20000, 128)
        self.hidden = nn.Linear(128, 64)
        self.out = nn.Linear(64, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        logits = self.out(torch.relu(self.hidden(self.embed(ids).mean(1))))
        return nn.functional.cross_entropy(logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Events(Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        print(f"batch {trainer.global_step}", flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"epoch_end {trainer.current_epoch}", flush=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        print(f"save {trainer.global_step}", flush=True)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20000, (8 * BATCHES_PER_EPOCH, 8), generator=g)
    labels = (ids[:, 0] > 10000).long()
    return DataLoader(TensorDataset(ids, labels), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))


def run(root: Path, ckpt_dir: Optional[Path], resume: bool = False) -> dict[str, torch.Tensor]:
    """Train to :data:`MAX_STEPS` (resuming from ``last.ckpt`` if asked); return the adapter tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions in every process, for bit-identical results
    try:
        torch.manual_seed(0)
        model = KillModel()
        callbacks: list[Callback] = [
            Events(),
            LoRACallback(r=4, alpha=8, dropout=0.1, target_modules=["hidden"], modules_to_save=["embed"],
                         merge_on_fit_end=False),
        ]  # fmt: skip
        if ckpt_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=EVERY_N_STEPS))
        trainer = pl.Trainer(
            **fit_kwargs(root, max_steps=MAX_STEPS, callbacks=callbacks, enable_checkpointing=ckpt_dir is not None)
        )
        trainer.fit(model, loader(), ckpt_path="last" if resume else None)
        return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    ckpt_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    state = run(ckpt_dir.parent, ckpt_dir, resume="--resume" in sys.argv)
    torch.save(state, out)
    print("done", flush=True)
