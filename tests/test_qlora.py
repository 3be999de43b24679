"""QLoRA on CPU: a 4-bit bitsandbytes base under fp32 adapters (lightning_lora.quantize, LoRACallback(quantize_base=...))."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import BertClassifier, fit_kwargs, tiny_llama, token_data, token_loader
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora import LoRACallback, adapter_state_dict, inject_lora, lora_layers, merge_lora
from lightning_lora.inject import lora_config_of
from lightning_lora.quantize import (
    dequantize_base,
    is_4bit_linear,
    keep_training_format,
    quantize_base,
    quantize_for_fit,
    weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")

LORA = dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], merge_on_fit_end=False)
ENCODER = "model.bert.encoder.layer.0"


def fit(tmp_path, module, max_steps=3, callbacks=(), ckpt_path=None, val=False, **lora):
    callback = LoRACallback(**{**LORA, "quantize_base": "nf4", **lora})
    extra = dict(val_check_interval=2, limit_val_batches=1) if val else dict(enable_checkpointing=bool(callbacks))
    trainer = pl.Trainer(callbacks=[callback, *callbacks], **fit_kwargs(tmp_path, max_steps=max_steps, **extra))
    trainer.fit(module, token_loader(n=24), token_loader(n=8) if val else None, ckpt_path=ckpt_path)
    return trainer


def test_quantize_base_replaces_frozen_linears_but_not_modules_to_save_or_tied_heads():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 4))
    before = weight_bytes(model)
    names = quantize_base(model, skip=["3"], device="cpu")
    assert names == ["0", "2"]
    assert is_4bit_linear(model[0]) and model[0].weight.dtype == torch.uint8
    assert type(model[3]) is nn.Linear
    base_ratio = (weight_bytes(model) - weight_bytes(model[3])) / (before - weight_bytes(model[3]))
    assert base_ratio <= 0.3  # nf4 + double quantization: ~0.13 of fp32

    llama = tiny_llama(tie=True)
    quantize_base(llama, device="cpu")
    assert llama.lm_head.weight is llama.model.embed_tokens.weight and type(llama.lm_head) is nn.Linear
    assert is_4bit_linear(llama.model.layers[0].mlp.down_proj)

    attention = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0)
    quantize_base(attention, device="cpu")
    assert type(attention.self_attn.out_proj) is not bnb.nn.Linear4bit  # read directly by nn.MultiheadAttention
    assert is_4bit_linear(attention.linear1)


def test_quantize_base_options_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    nf4, fp4 = copy.deepcopy(model), copy.deepcopy(model)
    quantize_base(nf4, "nf4", double_quant=False, device="cpu")
    quantize_base(fp4, "fp4", compute_dtype=torch.bfloat16, device="cpu")
    assert nf4[0].weight.quant_state.quant_type == "nf4" and nf4[0].weight.quant_state.state2 is None
    assert fp4[0].weight.quant_state.quant_type == "fp4" and fp4[0].weight.quant_state.state2 is not None
    assert nf4[0].compute_dtype == torch.float32 and fp4[0].compute_dtype == torch.bfloat16
    x = torch.randn(4, 128)
    assert not torch.equal(nf4(x), fp4(x).float())
    with pytest.raises(ValueError, match="quant_type"):
        quantize_base(copy.deepcopy(model), "int4")
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        quantize_base(inject_lora(copy.deepcopy(model), target_modules=["0"]))
    with pytest.raises(ValueError, match="quantize_base"):
        LoRACallback(quantize_base="int8")


def test_sharded_strategies_and_the_lightning_plugin_are_refused_with_the_way_out():
    from lightning.pytorch.plugins import BitsandbytesPrecision
    from lightning.pytorch.strategies import ModelParallelStrategy

    model = nn.Sequential(nn.Linear(64, 64))
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), precision_plugin=None)
    with pytest.raises(ValueError, match="single-device and DDP"):
        quantize_for_fit(model, trainer, "nf4", True, None, [])
    trainer = SimpleNamespace(strategy=None, precision_plugin=BitsandbytesPrecision("nf4", dtype=torch.float32))
    with pytest.raises(ValueError, match="Use one"):
        quantize_for_fit(model, trainer, "nf4", True, None, [])


def test_qlora_fit_trains_fp32_adapters_on_a_4bit_base_through_validation(tmp_path):
    module = BertClassifier()
    head_before = module.model.classifier.weight.detach().clone()
    fit(tmp_path, module, max_steps=4, val=True)  # validation (eval, no grad) between training steps
    query = module.get_submodule(f"{ENCODER}.attention.self.query")
    assert is_4bit_linear(query.base_layer) and query.base_layer.weight.dtype == torch.uint8
    assert is_4bit_linear(module.get_submodule(f"{ENCODER}.intermediate.dense"))  # non-target layers too
    assert query.lora_A.weight.dtype == torch.float32 and query.lora_B.weight.abs().sum() > 0
    head = module.model.classifier.modules_to_save
    assert type(head) is nn.Linear and head.weight.requires_grad and not torch.equal(head.weight, head_before)
    assert not getattr(query.base_layer.weight.quant_state, "packing_format_for_cpu", False)


def test_qlora_checkpoints_are_adapter_only_and_resume_exactly(tmp_path):
    full = BertClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path, full, max_steps=4, callbacks=[ckpt])
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(adapter_state_dict(full))
    assert not any("absmax" in key or "quant" in key for key in state)

    resumed = BertClassifier()
    fit(tmp_path / "b", resumed, max_steps=4, callbacks=[], ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    expected, got = adapter_state_dict(full), adapter_state_dict(resumed)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_merge_dequantizes_to_a_full_precision_model_with_the_same_outputs(tmp_path):
    module = BertClassifier()
    fp32_twin = BertClassifier()
    fit(tmp_path, module, max_steps=3, merge_on_fit_end=False)
    inject_lora(fp32_twin, lora_config_of(module))
    fp32_twin.load_state_dict(adapter_state_dict(module), strict=False)
    ids = token_data(8).tensors[0]
    module.eval(), fp32_twin.eval()
    with torch.no_grad():
        qlora_out, fp32_out = module(ids), fp32_twin(ids)
        merge_lora(module, unload=True)
        assert dequantize_base(module)
        merged_out = module(ids)
    assert not any(is_4bit_linear(m) for m in module.modules())
    assert all(p.dtype == torch.float32 for p in module.parameters())
    torch.testing.assert_close(merged_out, qlora_out, rtol=0, atol=1e-5)  # merge of the dequantized base is exact
    error = (merged_out - fp32_out).abs().max().item()
    assert 0 < error < 0.1  # 4-bit quantization error vs the fp32 adapted model


def test_merge_on_fit_end_leaves_a_float32_model(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, max_steps=2, merge_on_fit_end=True)
    assert not lora_layers(module)
    assert not any(is_4bit_linear(m) for m in module.modules())
    assert type(module.get_submodule(f"{ENCODER}.attention.self.query")) is nn.Linear


def test_lightning_bitsandbytes_plugin_converts_before_injection(tmp_path):
    """The plugin refuses CPU in the Trainer's checks; swapped in afterwards its conversion runs on CPU too."""
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = BertClassifier()
    trainer = pl.Trainer(callbacks=[LoRACallback(**LORA)], **fit_kwargs(tmp_path, max_steps=2, enable_checkpointing=False))
    trainer.strategy.precision_plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    head_before = module.model.classifier.weight.detach().clone()
    trainer.fit(module, token_loader(n=16))
    query = module.get_submodule(f"{ENCODER}.attention.self.query")
    assert is_4bit_linear(query.base_layer) and query.lora_B.weight.abs().sum() > 0
    head = module.model.classifier.modules_to_save
    assert type(head) is nn.Linear and head.weight.requires_grad and not torch.equal(head.weight, head_before)


def test_lora_wraps_layers_transformers_loaded_in_4bit(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    assert keep_training_format(model) > 0  # eval-mode 4-bit layers would repack for CPU inference otherwise
    inject_lora(model, target_modules=["q_proj", "v_proj"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert is_4bit_linear(q_proj.base_layer) and q_proj.lora_A.weight.shape == (8, 32)
    ids = token_data(4).tensors[0]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        q_proj.lora_B.weight.normal_()
        model.eval()
        before = model(input_ids=ids).logits
        merge_lora(model)
        assert type(q_proj.base_layer) is nn.Linear and q_proj.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-4)


def test_gradients_flow_through_frozen_4bit_layers():
    """Gradients flow through frozen 4-bit layers: the first layer's adapter (behind two of them) trains too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    quantize_base(model, device="cpu")
    inject_lora(model, target_modules=["0", "4"])
    x, y = torch.randn(16, 64), torch.randint(0, 2, (16,))
    for batch in DataLoader(list(zip(x, y)), batch_size=8):
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_save_merged_exports_a_full_precision_model_from_a_4bit_base(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lightning_lora import save_merged

    module = BertClassifier()
    fit(tmp_path, module, max_steps=2)
    ids = token_data(8).tensors[0]
    module.eval()
    with torch.no_grad():
        qlora_logits = module(ids)
    save_merged(module, tmp_path / "merged")
    assert any(is_4bit_linear(m) for m in module.modules())  # the live model is left as it was
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any(is_4bit_linear(m) for m in exported.modules())
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, qlora_logits, rtol=0, atol=1e-5)
