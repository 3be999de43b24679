"""GPU checks (marked `gpu`): mixed precision, QLoRA and DeepSpeed on CUDA. They skip with a reason on CPU-only machines."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from lora_test_modules import BertClassifier, fit_kwargs, token_loader

from lightning_lora import LoRACallback, adapter_state_dict, lora_layers
from lightning_lora.quantize import is_4bit_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
]
LORA = dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], merge_on_fit_end=False)


def fit(tmp_path, module, **overrides):
    callback_args = {k: overrides.pop(k) for k in ("quantize_base",) if k in overrides}
    trainer = pl.Trainer(
        callbacks=[LoRACallback(**LORA, **callback_args)],
        **fit_kwargs(tmp_path, accelerator="cuda", max_steps=3, enable_checkpointing=False, deterministic=False,
                     **overrides),  # fmt: skip
    )
    trainer.fit(module, token_loader(n=16))
    return trainer


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_trains_fp32_adapters_on_cuda(tmp_path, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    module = BertClassifier()
    fit(tmp_path, module, precision=precision)
    layers = lora_layers(module).values()
    assert all(layer.lora_B.weight.dtype == torch.float32 and layer.lora_B.weight.abs().sum() > 0 for layer in layers)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_quantize_base_on_cuda_quantizes_on_the_device(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, quantize_base="nf4")
    query = module.get_submodule("model.bert.encoder.layer.0.attention.self.query")
    assert is_4bit_linear(query.base_layer) and query.base_layer.weight.device.type == "cuda"
    assert query.base_layer.compute_dtype in (torch.bfloat16, torch.float16)
    assert query.lora_B.weight.dtype == torch.float32 and query.lora_B.weight.abs().sum() > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2 GPUs")
def test_ddp_nccl_trains(tmp_path):
    module = BertClassifier()
    fit(tmp_path, module, strategy="ddp_notebook", devices=2)
    assert all(v.abs().sum() > 0 for k, v in adapter_state_dict(module).items() if "lora_B" in k)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_checkpoint_excludes_the_frozen_base(tmp_path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = BertClassifier()
    trainer = fit(tmp_path, module, strategy=DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True))
    trainer.save_checkpoint(tmp_path / "ds.ckpt")
    saved = torch.load(next((tmp_path / "ds.ckpt").rglob("*model_states.pt")), weights_only=False)["module"]
    assert saved and all(".lora_" in k or ".modules_to_save." in k for k in saved)
