"""Resuming a LoRA run from adapter-only checkpoints: exact, and loud when the adapter does not fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import BertClassifier, LazyBertClassifier, fit_kwargs, token_loader

from lightning_lora import LoRACallback, adapter_state_dict

LORA = dict(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"])


def train(tmp_path, module, max_steps, ckpt_path=None, checkpoint=None, val=False, **lora_overrides):
    callbacks = [LoRACallback(**{**LORA, "merge_on_fit_end": False, **lora_overrides})]
    if checkpoint is not None:
        callbacks.append(checkpoint)
    trainer = pl.Trainer(
        callbacks=callbacks,
        **fit_kwargs(tmp_path, max_steps=max_steps, enable_checkpointing=checkpoint is not None),
    )
    loader = token_loader(n=48, batch_size=8, shuffle=True)  # 6 batches an epoch
    trainer.fit(module, loader, token_loader(n=16) if val else None, ckpt_path=ckpt_path)
    return adapter_state_dict(module)


def assert_bit_identical(resumed, reference):
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.parametrize(
    ("checkpoint_kwargs", "filename", "val"),
    [
        (dict(every_n_train_steps=4), "epoch=0-step=4.ckpt", False),  # mid-epoch
        (dict(every_n_epochs=1), "epoch=0-step=6.ckpt", False),  # epoch end (Lightning's default)
        (dict(every_n_epochs=1), "epoch=0-step=6.ckpt", True),  # epoch end, after validation
        (dict(every_n_train_steps=9), "epoch=1-step=9.ckpt", True),  # mid-epoch in the second epoch
    ],
)
def test_resume_from_adapter_only_checkpoint_is_bit_identical(tmp_path, checkpoint_kwargs, filename, val):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **checkpoint_kwargs)
    reference = train(tmp_path, BertClassifier(), max_steps=15, checkpoint=checkpoint, val=val)
    saved = torch.load(tmp_path / "ckpt" / filename, weights_only=True)
    assert all(".lora_" in k or ".modules_to_save." in k for k in saved["state_dict"])

    torch.manual_seed(12345)  # a different global RNG than the first run: the checkpoint must restore it
    resumed = train(tmp_path / "b", BertClassifier(), max_steps=15, ckpt_path=tmp_path / "ckpt" / filename, val=val)
    assert_bit_identical(resumed, reference)


def test_resume_into_lazily_built_model(tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    reference = train(tmp_path, LazyBertClassifier(), max_steps=8, checkpoint=checkpoint)
    resumed = train(tmp_path / "b", LazyBertClassifier(), max_steps=8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert_bit_identical(resumed, reference)


@pytest.fixture
def adapter_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    train(tmp_path, BertClassifier(), max_steps=2, checkpoint=checkpoint)
    return tmp_path / "ckpt" / "epoch=0-step=2.ckpt"


def test_other_rank_is_an_error_naming_shapes_and_settings(tmp_path, adapter_checkpoint):
    with pytest.raises(ValueError) as err:
        train(tmp_path / "b", BertClassifier(), max_steps=4, ckpt_path=adapter_checkpoint, r=8)
    message = str(err.value)
    assert "attention.self.query.lora_A.weight` has shape (4, 32) in the checkpoint" in message
    assert "but (8, 32) in the model" in message
    assert "r=4 there vs 8 here" in message


def test_other_targets_are_an_error(tmp_path, adapter_checkpoint):
    with pytest.raises(ValueError, match=r"unexpected `model\.bert\.encoder\.layer\.0\.attention\.self\.value\.lora_A"):
        train(tmp_path / "b", BertClassifier(), max_steps=4, ckpt_path=adapter_checkpoint, target_modules=["query"])
    with pytest.raises(ValueError, match=r"missing `model\.bert\.encoder\.layer\.0\.attention\.self\.key\.lora_A"):
        train(tmp_path / "c", BertClassifier(), max_steps=4, ckpt_path=adapter_checkpoint,
              target_modules=["query", "key", "value"])


def test_other_base_shapes_are_an_error(tmp_path, adapter_checkpoint):
    wider = BertClassifier(hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\) in the checkpoint .* but \(4, 48\) in the model"):
        train(tmp_path / "b", wider, max_steps=4, ckpt_path=adapter_checkpoint)


def test_full_checkpoint_without_adapters_is_an_error(tmp_path):
    module = BertClassifier()
    trainer = pl.Trainer(**fit_kwargs(tmp_path, max_steps=1))
    trainer.fit(module, token_loader(n=8))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain\.ckpt .*without adapter tensors.*`model.bert.encoder.layer.0.attention"):
        train(tmp_path / "b", BertClassifier(), max_steps=2, ckpt_path=tmp_path / "plain.ckpt")


def test_validate_from_adapter_only_checkpoint_in_a_fresh_module(tmp_path):
    module = BertClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6)
    train(tmp_path, module, max_steps=6, checkpoint=checkpoint, dropout=0.0)
    val = token_loader(n=16)
    trained = pl.Trainer(**fit_kwargs(tmp_path)).validate(module, val, verbose=False)[0]["val_loss"]

    fresh = BertClassifier()
    callback = LoRACallback(**{**LORA, "dropout": 0.0})
    trainer = pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path / "b"))
    restored = trainer.validate(fresh, val, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=6.ckpt", verbose=False)
    untrained = pl.Trainer(**fit_kwargs(tmp_path / "c")).validate(BertClassifier(), val, verbose=False)[0]["val_loss"]
    assert restored[0]["val_loss"] == pytest.approx(trained, abs=1e-6)
    assert abs(untrained - trained) > 1e-3  # the checkpoint really carried the training
