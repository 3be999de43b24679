"""LoRACallback on ordinary LightningModules: inject, freeze, optimizer, checkpoints, merge."""

from __future__ import annotations

import functools
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import (
    BertClassifier,
    EarlyOptimizerClassifier,
    LazyBertClassifier,
    NoParams,
    fit_kwargs,
    token_data,
    token_loader,
)
from torch import nn

from lightning_lora import LoRACallback, ModulesToSave, lora_layers
from lightning_lora.callback import CHECKPOINT_CONFIG_KEY

TARGETS = dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def lora_callback(**overrides) -> LoRACallback:
    return LoRACallback(**{**TARGETS, **overrides})


def fit(tmp_path, module, callbacks, loader=None, **trainer_overrides) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, **fit_kwargs(tmp_path, **{"max_steps": 6, **trainer_overrides}))
    trainer.fit(module, loader or token_loader())
    return trainer


def test_fit_trains_only_adapters_and_head(tmp_path):
    module = BertClassifier()
    base_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = lora_callback(merge_on_fit_end=False)
    fit(tmp_path, module, [callback], enable_checkpointing=False)

    layers = lora_layers(module)
    assert sorted(layers) == [
        f"model.bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert len(trainable) == 4 * 2 + 2
    # The frozen base did not move; the adapters and the head copy did.
    state = module.state_dict()
    for key, value in base_before.items():
        key = "model." + key
        wrapped = key.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
        wrapped = wrapped.replace("classifier.", "classifier.original_module.")
        assert torch.equal(state[wrapped], value), key
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in layers.values())
    head = module.model.classifier
    assert isinstance(head, ModulesToSave)
    assert not torch.equal(head.modules_to_save.weight, head.original_module.weight)


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    module = BertClassifier()
    trainer = fit(tmp_path, module, [lora_callback(merge_on_fit_end=False)], enable_checkpointing=False)
    optimizer = trainer.optimizers[0]
    with_state = {id(p) for p in optimizer.state}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert with_state == trainable


def test_checkpoints_are_adapter_only(tmp_path):
    module = BertClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(tmp_path, module, [lora_callback(merge_on_fit_end=False), ckpt])
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {n for n, p in module.named_parameters() if p.requires_grad}
    assert checkpoint[CHECKPOINT_CONFIG_KEY]["r"] == 4
    assert checkpoint["optimizer_states"] and checkpoint["loops"]


def test_save_weights_only_checkpoint_is_adapter_only(tmp_path):
    module = BertClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True, every_n_train_steps=6)
    fit(tmp_path, module, [lora_callback(merge_on_fit_end=False), ckpt])
    checkpoint = torch.load(tmp_path / "w" / "epoch=0-step=6.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert CHECKPOINT_CONFIG_KEY in checkpoint
    assert "optimizer_states" not in checkpoint


def test_adapter_checkpoint_is_under_one_percent_for_bert_base(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    class BertBase(BertClassifier):
        def __init__(self):
            pl.LightningModule.__init__(self)
            torch.manual_seed(0)
            self.model = BertForSequenceClassification(BertConfig(num_labels=2))  # 110M parameters
            self.lr = 1e-3

    module = BertBase()
    full_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    ids = torch.randint(1, 1000, (2, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.tensor([0, 1])), batch_size=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=1)
    fit(tmp_path, module, [LoRACallback(r=8, alpha=16, target_modules=["query", "value"]), ckpt], loader, max_steps=1)
    size = os.path.getsize(tmp_path / "c" / "epoch=0-step=1.ckpt")
    assert size <= 0.01 * full_bytes, (size, full_bytes)


def test_merge_at_fit_end_gives_plain_model_with_same_outputs(tmp_path):
    module = BertClassifier()
    callback = lora_callback()
    ids = token_data(8)[:][0]
    outputs = {}

    class Capture(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                outputs["unmerged"] = pl_module(ids)

    fit(tmp_path, module, [callback, Capture()], enable_checkpointing=False)
    assert not lora_layers(module)
    assert type(module.model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert type(module.model.classifier) is nn.Linear
    module.eval()
    with torch.no_grad():
        merged = module(ids)
    assert (merged - outputs["unmerged"]).abs().max() <= 1e-5
    assert not torch.equal(merged, BertClassifier().eval()(ids))  # training changed something

    # validate/test after the merged fit run the merged model and do not re-inject.
    trainer = pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path))
    trainer.validate(module, token_loader())
    trainer.test(module, token_loader())
    assert not lora_layers(module)


def test_model_built_in_configure_model_gets_adapters(tmp_path):
    module = LazyBertClassifier()
    callback = lora_callback(merge_on_fit_end=False)
    fit(tmp_path, module, [callback], enable_checkpointing=False)
    assert len(lora_layers(module)) == 4
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(module).values())


def test_dry_run_reports_without_changing_the_module():
    module = BertClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    summary = lora_callback().dry_run(module)
    assert not lora_layers(module)
    assert module.state_dict().keys() == before.keys()
    assert summary.by_type == {"Linear": 4}
    adapter = 4 * 4 * (32 + 32)
    head = 32 * 2 + 2
    assert summary.adapter_params == adapter
    assert summary.trainable_params == adapter + head
    assert "4 Linear" in str(summary)
    lazy = LazyBertClassifier()
    assert lora_callback().dry_run(lazy).adapter_params == adapter


def test_callback_builds_optimizer_with_groups_and_lora_plus(tmp_path):
    module = BertClassifier()
    callback = lora_callback(
        merge_on_fit_end=False,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        lora_b_lr_ratio=4.0,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1.0),
    )
    trainer = fit(tmp_path, module, [callback], enable_checkpointing=False)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"lora_A", "lora_B", "modules_to_save", "no_decay"}
    assert groups["lora_A"]["lr"] == pytest.approx(1e-3)
    assert groups["lora_B"]["lr"] == pytest.approx(4e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["lora_A"]["weight_decay"] == 0.1
    assert len(groups["no_decay"]["params"]) == 1  # the head's bias
    assert len(groups["lora_B"]["params"]) == 4
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_parameters_missing_from_optimizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="missing from every optimizer param group.*lora_A"):
        fit(tmp_path, EarlyOptimizerClassifier(), [lora_callback()], enable_checkpointing=False)


def test_module_without_parameters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="NoParams, which has no parameters"):
        fit(tmp_path, NoParams(), [lora_callback()], enable_checkpointing=False)


def test_targets_matching_nothing_list_candidates(tmp_path):
    with pytest.raises(ValueError, match=r"matched no module.*query \(Linear x2\)"):
        fit(tmp_path, BertClassifier(), [lora_callback(target_modules=["q_proj"])], enable_checkpointing=False)


def test_callback_option_errors():
    with pytest.raises(ValueError, match="rank `r` must be a positive integer"):
        LoRACallback(r=0)
    with pytest.raises(ValueError, match="`alpha` must be a positive"):
        LoRACallback(alpha=-1)
    with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\)"):
        LoRACallback(dropout=1.0)
    with pytest.raises(ValueError, match="`lora_b_lr_ratio` needs `optimizer`"):
        LoRACallback(lora_b_lr_ratio=2.0)


def test_existing_adapters_with_other_config_are_an_error(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, [lora_callback(merge_on_fit_end=False)], enable_checkpointing=False)
    with pytest.raises(ValueError, match="already holds LoRA adapters with a different config"):
        fit(tmp_path, module, [lora_callback(r=8)], enable_checkpointing=False)
