"""``ResumeState``: a run resumed from a checkpoint ends bit-identical to an uninterrupted run.

Each case trains run A without interruption while ``ModelCheckpoint`` writes checkpoints, then trains run B
with a fresh module (same initial weights), fresh Trainer and fresh DataLoader from one of them, after
re-seeding the global RNG differently, and compares all weights with ``torch.equal``. The module has dropout,
so the RNG state at every step matters as well as the data order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora.resume import ResumeState

KEY = "resume_state"
BATCHES_PER_EPOCH = 6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def quiet_lightning():
    """Keep Lightning's info lines out of this module's output without changing other modules' logging."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.ERROR)
    yield
    lightning_logger.setLevel(level)


class ResumeCallback(Callback):
    """Minimal callback that forwards its hooks to ``ResumeState``, as the LoRA callback does."""

    def __init__(self) -> None:
        self.resume = ResumeState()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[KEY] = self.resume.state_dict(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if KEY in checkpoint:
            self.resume.load_state_dict(trainer, checkpoint[KEY], checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resume.on_train_start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resume.on_train_epoch_start(trainer)


class EventLog(Callback):
    """Records the training hooks as ``S<epoch>``/``b<epoch>.<batch_idx>``/``V``/``E<epoch>`` and final counters."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append(f"S{trainer.current_epoch}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.events.append(f"b{trainer.current_epoch}.{idx}")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append("V")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append(f"E{trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `_batches_that_stepped` is the step loggers see; an off-by-one there means a mis-restored loop
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.events.append(f"end step={trainer.global_step} epoch={trainer.current_epoch} logged={stepped}")


class TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def make_loader(shuffle: str, n: int = 8 * BATCHES_PER_EPOCH) -> DataLoader:
    """A deterministic dataset; ``shuffle`` is "none", "generator" (seeded) or "global" (global torch RNG)."""
    data_rng = torch.Generator().manual_seed(7)
    dataset = TensorDataset(torch.randn(n, 8, generator=data_rng), torch.randn(n, 1, generator=data_rng))
    generator = torch.Generator().manual_seed(3) if shuffle == "generator" else None
    return DataLoader(dataset, batch_size=8, shuffle=shuffle != "none", generator=generator)


def fit(
    root: Path,
    init: dict[str, torch.Tensor],
    *,
    val: bool,
    shuffle: str,
    max_steps: int = -1,
    max_epochs: int | None = None,
    checkpoint: ModelCheckpoint | None = None,
    ckpt_path: Path | None = None,
    helper: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Train a fresh ``TinyModel`` from ``init`` with a fresh Trainer and loaders; return weights and hook events."""
    model = TinyModel()
    model.load_state_dict(init)
    log = EventLog()
    callbacks: list[Callback] = [log, ResumeCallback()] if helper else [log]
    if checkpoint is not None:
        callbacks.append(checkpoint)
    trainer = pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        deterministic=True,
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    val_loader = make_loader("none", n=16) if val else None
    trainer.fit(model, make_loader(shuffle), val_loader, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, log.events


def all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def init() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyModel().state_dict().items()}


def run_pair(tmp_path: Path, init: dict, checkpoint_kwargs: dict, filename: str, **kwargs: Any) -> tuple:
    """Run A with checkpoints (global seed 0); return its weights, hook events and the checkpoint to resume."""
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **checkpoint_kwargs)
    weights, events = fit(tmp_path / "a", init, checkpoint=checkpoint, **kwargs)
    ckpt = tmp_path / "ckpt" / filename
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    return weights, events, ckpt


def assert_same_run(resumed: tuple, weights: dict, events: list[str]) -> None:
    """Same final weights, and B's hooks/counters are exactly the tail of A's (no replayed or lost batch)."""
    resumed_weights, resumed_events = resumed
    assert resumed_events == events[-len(resumed_events) :]
    assert all_equal(resumed_weights, weights)


CASES = {
    # mid-epoch, first epoch (the iterator was built before any hook)
    "mid_epoch0": (dict(every_n_train_steps=4), "epoch=0-step=4.ckpt", dict(val=False, shuffle="none")),
    # mid-epoch, second epoch, seeded shuffle, with validation
    "mid_epoch1_shuffle_val": (
        dict(every_n_train_steps=4),
        "epoch=1-step=8.ckpt",
        dict(val=True, shuffle="generator"),
    ),
    # mid-epoch, shuffle drawn from the global torch RNG
    "mid_epoch1_global_shuffle": (
        dict(every_n_train_steps=4),
        "epoch=1-step=8.ckpt",
        dict(val=False, shuffle="global"),
    ),
    # saved in on_train_batch_end of the last batch, right before validation
    "last_batch_val": (dict(every_n_train_steps=3), "epoch=0-step=6.ckpt", dict(val=True, shuffle="global")),
    # epoch end (Lightning's default ModelCheckpoint), no validation
    "epoch_end": (dict(every_n_epochs=1), "epoch=0-step=6.ckpt", dict(val=False, shuffle="none")),
    # epoch end after validation, seeded shuffle, resumed in the second epoch
    "epoch_end_shuffle_val": (dict(every_n_epochs=1), "epoch=1-step=12.ckpt", dict(val=True, shuffle="generator")),
    # epoch end with epoch-based (not step-based) stopping
    "epoch_end_max_epochs": (
        dict(every_n_epochs=1),
        "epoch=0-step=6.ckpt",
        dict(val=True, shuffle="generator", max_steps=-1, max_epochs=3),
    ),
}


def case_kwargs(case: str) -> tuple[dict, str, dict]:
    checkpoint_kwargs, filename, kwargs = CASES[case]
    return checkpoint_kwargs, filename, {"max_steps": 15, **kwargs}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(tmp_path: Path, init: dict, case: str) -> None:
    checkpoint_kwargs, filename, kwargs = case_kwargs(case)
    weights, events, ckpt = run_pair(tmp_path, init, checkpoint_kwargs, filename, **kwargs)

    torch.manual_seed(12345)  # a different global RNG than run A: the checkpoint must restore it
    assert_same_run(fit(tmp_path / "b", init, ckpt_path=ckpt, **kwargs), weights, events)


@pytest.mark.parametrize("shuffle", ["generator", "global"])
def test_resume_of_a_resumed_run_is_bit_identical(tmp_path: Path, init: dict, shuffle: str) -> None:
    """A -> B (from an epoch-end checkpoint) -> C (from B's own mid-epoch checkpoint in B's first epoch)."""
    kwargs = dict(max_steps=15, val=True, shuffle=shuffle)
    weights, events, ckpt = run_pair(tmp_path, init, dict(every_n_epochs=1), "epoch=0-step=6.ckpt", **kwargs)

    torch.manual_seed(1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt_b", save_top_k=-1, every_n_train_steps=4)
    assert_same_run(fit(tmp_path / "b", init, ckpt_path=ckpt, checkpoint=checkpoint, **kwargs), weights, events)
    torch.manual_seed(2)
    resumed = fit(tmp_path / "c", init, ckpt_path=tmp_path / "ckpt_b" / "epoch=1-step=8.ckpt", **kwargs)
    assert_same_run(resumed, weights, events)


@pytest.mark.parametrize("case", ["mid_epoch1_shuffle_val", "epoch_end"])
def test_plain_lightning_is_not_exact(tmp_path: Path, init: dict, case: str) -> None:
    """Control: the same resume without the helper differs, so the tests above prove something."""
    checkpoint_kwargs, filename, kwargs = case_kwargs(case)
    weights, events, ckpt = run_pair(tmp_path, init, checkpoint_kwargs, filename, **kwargs)

    torch.manual_seed(12345)
    resumed_weights, resumed_events = fit(tmp_path / "b", init, ckpt_path=ckpt, helper=False, **kwargs)
    assert not all_equal(resumed_weights, weights)
    if case == "epoch_end":  # Lightning replays a batch of epoch 0, then ends an epoch short
        assert resumed_events != events[-len(resumed_events) :]


def test_rng_restore_matters(tmp_path: Path, init: dict) -> None:
    """Control: with the data positioned right but a wrong saved torch RNG state, dropout masks differ."""
    checkpoint_kwargs, filename, kwargs = case_kwargs("epoch_end")
    weights, events, ckpt = run_pair(tmp_path, init, checkpoint_kwargs, filename, **kwargs)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint[KEY]["rng"]["global"]["torch"] = torch.Generator().manual_seed(99).get_state()
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)

    torch.manual_seed(12345)
    resumed_weights, resumed_events = fit(tmp_path / "b", init, ckpt_path=tampered, **kwargs)
    assert resumed_events == events[-len(resumed_events) :]
    assert not all_equal(resumed_weights, weights)


def test_state_is_weights_only_loadable(tmp_path: Path, init: dict) -> None:
    checkpoint_kwargs, filename, kwargs = case_kwargs("mid_epoch1_shuffle_val")
    _, _, ckpt = run_pair(tmp_path, init, checkpoint_kwargs, filename, **{**kwargs, "max_steps": 8})
    state = torch.load(ckpt, weights_only=True)[KEY]
    assert state["batches_consumed"] == 2 and not state["epoch_finished"]
    assert isinstance(state["rng"]["global"]["torch"], torch.Tensor)
    assert len(state["rng"]["loaders"]) == 1  # the seeded shuffle generator
    assert state["epoch_start"]["iterator_built_after"]  # epoch 1's iterator is built after on_train_epoch_start
