"""LoRACallback under Lightning's own precision plugins (CPU), and the bitsandbytes guarantee."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from lora_test_modules import BertClassifier, LazyBertClassifier, fit_kwargs, token_loader
from torch import nn

from lightning_lora import LoRACallback, lora_layers

LORA = dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], merge_on_fit_end=False)


def fit(tmp_path, module, precision, max_steps=3, **callback_overrides):
    trainer = pl.Trainer(
        callbacks=[LoRACallback(**{**LORA, **callback_overrides})],
        **fit_kwargs(tmp_path, precision=precision, max_steps=max_steps, enable_checkpointing=False),
    )
    trainer.fit(module, token_loader(n=16))
    return trainer


@pytest.mark.parametrize("module_cls", [BertClassifier, LazyBertClassifier])
def test_bf16_true_keeps_adapters_fp32_and_trains_them(tmp_path, module_cls):
    module = module_cls()
    fit(tmp_path, module, "bf16-true")
    layer = lora_layers(module)["model.bert.encoder.layer.0.attention.self.query"]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert layer.lora_B.weight.abs().sum() > 0


def test_bf16_true_with_adapter_dtype_none_follows_the_model(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, "bf16-true", adapter_dtype=None)
    layer = lora_layers(module)["model.bert.encoder.layer.0.attention.self.value"]
    assert layer.lora_B.weight.dtype == torch.bfloat16
    assert layer.lora_B.weight.abs().sum() > 0


def test_bf16_mixed_trains_fp32_adapters(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, "bf16-mixed")
    layers = lora_layers(module).values()
    assert all(layer.lora_B.weight.dtype == torch.float32 for layer in layers)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in layers)
    assert module.model.bert.embeddings.word_embeddings.weight.dtype == torch.float32


def test_adapters_are_not_linear_layers_so_quantizers_skip_them():
    """Lightning's BitsandbytesPrecision (and torch.ao) replace every nn.Linear they find."""
    module = BertClassifier()
    LoRACallback(**LORA)._ensure_injected(module)
    for layer in lora_layers(module).values():
        assert isinstance(layer.base_layer, nn.Linear)
        assert not any(isinstance(m, nn.Linear) for m in (layer.lora_A, layer.lora_B))


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="Lightning's BitsandbytesPrecision needs CUDA and bitsandbytes (CPU is refused by the plugin)",
)
def test_bitsandbytes_precision_quantizes_base_but_never_adapters(tmp_path):
    import bitsandbytes as bnb
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = BertClassifier()
    trainer = pl.Trainer(
        callbacks=[LoRACallback(**LORA)],
        plugins=[BitsandbytesPrecision("nf4", dtype=torch.bfloat16)],
        **fit_kwargs(tmp_path, accelerator="cuda", max_steps=3, enable_checkpointing=False),
    )
    trainer.fit(module, token_loader(n=16))
    for layer in lora_layers(module).values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.lora_A.weight.dtype == torch.float32
        assert layer.lora_B.weight.abs().sum() > 0
