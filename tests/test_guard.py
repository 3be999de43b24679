"""Dead-adapter guard: adapters that get no gradient are named before they silently train nothing."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_lora import DeadAdapterError, LoRACallback, find_dead_adapters, inject_lora
from lora_test_modules import fit_kwargs


class ReadsChildWeight(nn.Module):
    """A parent that uses ``proj.weight`` itself and never calls ``proj`` (as MultiheadAttention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.live = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.live(F.linear(x, self.proj.weight, self.proj.bias))


class DeadAdapterModel(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.block = ReadsChildWeight()
        self.unused = nn.Linear(32, 32)  # built, never used in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.block(x))


class OddBatchesOnly(BoringModel):
    """`extra` runs only on odd batches: with accumulation it still gets a gradient before the first step."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(32, 32)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        x = self.extra(batch) if batch_idx % 2 else batch
        return self.loss(self.layer(x))


def fit(tmp_path, model, callback, **overrides):
    trainer = pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path, max_steps=2, enable_checkpointing=False, **overrides))
    trainer.fit(model)
    return trainer


def test_error_names_the_module_whose_parent_reads_its_weight(tmp_path) -> None:
    callback = LoRACallback(r=2, target_modules=["proj", "live", "unused"])
    with pytest.raises(DeadAdapterError) as info:
        fit(tmp_path, DeadAdapterModel(), callback)
    message = str(info.value)
    assert "received no gradient in the first training step" in message
    assert "(2 of 3 LoRA layers)" in message
    assert "`block.proj` (LoRA on Linear): its forward was never called" in message
    assert "a parent module reads `block.proj.weight` directly" in message
    assert "`unused`" in message and "`block.live`" not in message
    assert "exclude_modules=['block.proj', 'unused']" in message


def test_warn_mode_trains_the_live_adapters(tmp_path, caplog) -> None:
    model = DeadAdapterModel()
    callback = LoRACallback(r=2, target_modules=["proj", "live"], dead_adapter_check="warn", merge_on_fit_end=False)
    with caplog.at_level(logging.WARNING, logger="lightning_lora.guard"):
        fit(tmp_path, model, callback)
    assert "`block.proj`" in caplog.text
    assert model.block.live.lora_B.weight.abs().sum() > 0  # trained
    assert model.block.proj.lora_B.weight.grad is None and not model.block.proj.lora_B.weight.any()  # dead


def test_zero_a_gradient_at_the_first_step_is_not_an_error(tmp_path) -> None:
    """With B = 0, ∂L/∂A is exactly zero at step 1: a healthy adapter must pass."""
    model = BoringModel()
    inject_lora(model, target_modules=["layer"], r=2)
    model(torch.randn(4, 32)).sum().backward()
    assert not model.layer.lora_A.weight.grad.any() and model.layer.lora_B.weight.grad.any()
    assert find_dead_adapters(model) == {}
    fit(tmp_path, BoringModel(), LoRACallback(r=2, target_modules=["layer"]))


def test_gradient_accumulation_checks_after_all_micro_batches(tmp_path) -> None:
    fit(tmp_path, OddBatchesOnly(), LoRACallback(r=2, target_modules=["layer", "extra"]), accumulate_grad_batches=2)
    # without accumulation the first step sees batch 0 only: `extra` got nothing yet
    with pytest.raises(DeadAdapterError, match=r"`extra` \(LoRA on Linear\)"):
        fit(tmp_path, OddBatchesOnly(), LoRACallback(r=2, target_modules=["layer", "extra"]))


def test_loss_reaching_no_adapter_gets_our_error_not_torchs(tmp_path) -> None:
    callback = LoRACallback(r=2, target_modules=["proj"])
    with pytest.raises(DeadAdapterError, match=r"(?s)loss does not depend on any trainable parameter.*`block.proj` .*forward was never called"):
        fit(tmp_path, DeadAdapterModel(), callback)


def test_off_mode_and_bad_option(tmp_path) -> None:
    fit(tmp_path, DeadAdapterModel(), LoRACallback(r=2, target_modules=["proj", "live"], dead_adapter_check="off"))
    with pytest.raises(ValueError, match=r"dead_adapter_check.*'error', 'warn', 'off'.*got 'raise'"):
        LoRACallback(dead_adapter_check="raise")


def test_dry_run_with_a_sample_batch(tmp_path) -> None:
    model = DeadAdapterModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LoRACallback(r=2, target_modules=["proj", "live"], dead_adapter_check="warn")
    summary = callback.dry_run(model, sample_batch=torch.randn(4, 32))
    assert summary.dead_adapters == {"block.proj": "its forward was never called"}
    assert "DEAD (no gradient on the sample batch): block.proj" in str(summary)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(DeadAdapterError, match="in the dry run's sample batch"):
        LoRACallback(r=2, target_modules=["proj", "live"]).dry_run(model, sample_batch=torch.randn(4, 32))
    assert LoRACallback(r=2, target_modules=["live"]).dry_run(model, sample_batch=torch.randn(4, 32)).dead_adapters == {}
