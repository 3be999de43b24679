"""Base-model fingerprint: recorded in every adapter file and checkpoint, checked on every load, naming the
first module whose base weights differ; ``peft``-written adapters (no fingerprint) load as before."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import BertClassifier, fit_kwargs, tiny_bert, token_loader
from safetensors import safe_open

from lightning_lora import (
    CheckpointError,
    LoRACallback,
    LoRAConfig,
    base_fingerprint,
    inject_lora,
    load_adapter,
    load_adapter_checkpoint,
    save_adapter,
)
from lightning_lora.fingerprint import FINGERPRINT_KEY, METADATA_KEY, SAMPLES_PER_MODULE

CONFIG = LoRAConfig(r=4, alpha=8, target_modules=["query", "value"])
PERTURBED = "bert.encoder.layer.1.attention.self.value"


def trained_adapter(tmp_path):
    model = tiny_bert()
    inject_lora(model, CONFIG)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model, save_adapter(model, tmp_path / "adapter")


def perturbed_base():
    model = tiny_bert()
    with torch.no_grad():
        model.get_submodule(PERTURBED).weight.mul_(1.01)
    return model


def test_fingerprint_covers_every_adapted_module_and_tells_weights_apart():
    model = tiny_bert()
    inject_lora(model, CONFIG)
    fingerprint = base_fingerprint(model)
    names = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert list(fingerprint["modules"]) == names
    assert base_fingerprint(tiny_bert(), names) == fingerprint  # the same before injection
    other = base_fingerprint(tiny_bert(seed=1), names)["modules"]
    assert all(other[n] != fingerprint["modules"][n] for n in names)
    perturbed = base_fingerprint(perturbed_base(), names)["modules"]
    assert [n for n in names if perturbed[n] != fingerprint["modules"][n]] == [PERTURBED]


def test_fingerprint_is_the_same_for_a_bfloat16_copy_and_its_own_class_for_float16():
    names = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    fp32 = base_fingerprint(tiny_bert(), names)["modules"]
    assert base_fingerprint(tiny_bert().to(torch.bfloat16), names)["modules"] == fp32
    assert base_fingerprint(tiny_bert().double(), names)["modules"] == fp32
    fp16 = base_fingerprint(tiny_bert().half(), names)["modules"]
    assert all(d.startswith("f16:") for d in fp16.values()) and all(d.startswith("bf16:") for d in fp32.values())


def test_large_weights_are_sampled_at_spread_out_positions():
    big, small = torch.nn.Linear(512, 256), torch.nn.Linear(16, 8)
    assert big.weight.numel() > SAMPLES_PER_MODULE >= small.weight.numel()
    before = base_fingerprint(big, [""])["modules"][""]
    with torch.no_grad():
        big.weight[200:].mul_(2)  # only the last rows: the sample reaches them
    assert base_fingerprint(big, [""])["modules"][""] != before
    before = base_fingerprint(small, [""])["modules"][""]
    with torch.no_grad():
        small.weight[7, 15] += 1  # a small weight is hashed whole
    assert base_fingerprint(small, [""])["modules"][""] != before


def test_peft_file_records_fingerprint_and_peft_still_loads_it(tmp_path):
    from peft import PeftModel

    model, directory = trained_adapter(tmp_path)
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        recorded = json.loads(f.metadata()[METADATA_KEY])
    assert recorded == base_fingerprint(model)
    ids = torch.randint(1, 90, (2, 8))
    peft_model = PeftModel.from_pretrained(tiny_bert(), str(directory)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_adapter_same_base_passes_perturbed_base_names_module(tmp_path):
    model, directory = trained_adapter(tmp_path)
    ids = torch.randint(1, 90, (2, 8))
    fresh = load_adapter(tiny_bert(), directory)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)

    other = perturbed_base()
    with pytest.raises(CheckpointError, match=rf"different base model: the weights of `{PERTURBED}` differ"):
        load_adapter(other, directory)
    assert not any("lora_" in n for n, _ in other.named_parameters())  # checked before anything was injected
    with pytest.warns(UserWarning, match=rf"weights of `{PERTURBED}` differ"):
        load_adapter(other, directory, check_base_fingerprint="warn")


def test_adapter_written_by_peft_has_no_fingerprint_and_loads(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        assert METADATA_KEY not in (f.metadata() or {})
    load_adapter(perturbed_base(), tmp_path / "peft")  # nothing to compare: loads as before


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    callback = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], merge_on_fit_end=False)
    trainer = pl.Trainer(callbacks=[callback, checkpoint], **fit_kwargs(root, max_steps=2))
    trainer.fit(BertClassifier(), token_loader(n=16))
    return root / "epoch=0-step=2.ckpt"


def perturbed_classifier():
    module = BertClassifier()
    with torch.no_grad():
        module.get_submodule("model." + PERTURBED).weight.mul_(1.01)
    return module


def test_checkpoint_records_fingerprint_and_load_adapter_checkpoint_checks_it(lora_checkpoint):
    checkpoint = torch.load(lora_checkpoint, weights_only=True)
    assert f"model.{PERTURBED}" in checkpoint[FINGERPRINT_KEY]["modules"]
    load_adapter_checkpoint(BertClassifier(), lora_checkpoint)
    with pytest.raises(CheckpointError, match=rf"step=2\.ckpt .*the weights of `model\.{PERTURBED}` differ"):
        load_adapter_checkpoint(perturbed_classifier(), lora_checkpoint)
    with pytest.warns(UserWarning, match="differ"):
        load_adapter_checkpoint(perturbed_classifier(), lora_checkpoint, check_base_fingerprint="warn")


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_resume_onto_other_base_names_module(tmp_path, lora_checkpoint, mode):
    callback = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], check_base_fingerprint=mode)
    trainer = pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path, max_steps=3, enable_checkpointing=False))
    if mode == "error":
        with pytest.raises(CheckpointError, match=rf"the weights of `model\.{PERTURBED}` differ"):
            trainer.fit(perturbed_classifier(), token_loader(n=16), ckpt_path=lora_checkpoint)
    else:
        with pytest.warns(UserWarning, match=rf"`model\.{PERTURBED}` differ"):
            trainer.fit(perturbed_classifier(), token_loader(n=16), ckpt_path=lora_checkpoint)
        assert trainer.global_step == 3


def test_invalid_option_is_an_error():
    with pytest.raises(ValueError, match="`check_base_fingerprint` must be one of"):
        LoRACallback(check_base_fingerprint="ignore")
