"""Adapter files: PEFT export and import, adapter-only checkpoints, merged export, README example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lora_test_modules as shared
import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    inject_lora,
    load_adapter,
    load_adapter_checkpoint,
    lora_layers,
    save_adapter,
    save_merged,
)
from lightning_lora.io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

TOL = {"atol": 1e-5, "rtol": 0}
BUILDERS = {"bert": shared.tiny_bert, "gpt2": shared.tiny_gpt2, "llama": shared.tiny_llama}
CASES = [
    ("bert", ["query", "value"], None),
    ("bert", ["query", "value"], ["classifier"]),
    ("gpt2", ["c_attn"], None),
    ("llama", ["q_proj", "v_proj"], None),
]


def ids() -> torch.Tensor:
    return torch.randint(1, shared.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids())
        return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def train_randomly(model: nn.Module) -> None:
    """Stand-in for training: non-zero B (a zero B would hide a broken load) and a changed head."""
    g = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=g) * 0.5)


def adapted(kind: str, targets, to_save, wrap: bool = False) -> nn.Module:
    model = shared.BertClassifier() if wrap else BUILDERS[kind]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, modules_to_save=to_save))
    train_randomly(model)
    return model.eval()


def assert_peft_loads_exactly(peft_model: peft.PeftModel, directory: Path) -> None:
    """No missing and no unexpected keys: the file holds exactly what PEFT's model has."""
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    written = {k: tuple(v.shape) for k, v in load_peft_weights(str(directory)).items()}
    assert written == expected


# -- PEFT export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, targets, to_save", CASES)
def test_peft_loads_our_adapter_with_equal_outputs(tmp_path, kind, targets, to_save):
    model = adapted(kind, targets, to_save)
    save_adapter(model, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path).eval()
    assert_peft_loads_exactly(peft_model, tmp_path)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(n.removeprefix("base_model.model.") for n in wrapped) == sorted(lora_layers(model))
    torch.testing.assert_close(logits(peft_model), logits(model), **TOL)
    assert (logits(peft_model) - logits(BUILDERS[kind]())).abs().max() > 1e-3  # the adapter matters

    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == targets  # the user's spec selects exactly the adapted modules
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    assert config["modules_to_save"] == to_save
    keys = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    if to_save:  # PEFT stores the trained head under the head's own path
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(keys)


def test_export_from_lightning_module_is_relative_to_the_transformers_model(tmp_path):
    module = adapted("bert", ["query", "value"], ["classifier"], wrap=True)
    module.model.name_or_path = "org/tiny-bert"
    save_adapter(module, tmp_path)

    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "org/tiny-bert"
    peft_model = peft.PeftModel.from_pretrained(shared.tiny_bert(), tmp_path).eval()
    assert_peft_loads_exactly(peft_model, tmp_path)
    torch.testing.assert_close(logits(peft_model), logits(module), **TOL)


def test_export_writes_full_names_when_the_spec_would_select_more(tmp_path):
    model = adapted("bert", r"model\.bert\.encoder\.layer\.0\.attention\.self\.query", None, wrap=True)
    save_adapter(model, tmp_path)  # the regex is relative to the LightningModule: it means nothing to PEFT
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]
    peft_model = peft.PeftModel.from_pretrained(shared.tiny_bert(), tmp_path).eval()
    assert_peft_loads_exactly(peft_model, tmp_path)
    torch.testing.assert_close(logits(peft_model), logits(model), **TOL)


# -- PEFT import ---------------------------------------------------------------------------------
def peft_saved(kind: str, targets, to_save, directory: Path) -> peft.PeftModel:
    peft_model = peft.get_peft_model(
        BUILDERS[kind](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=to_save)
    )
    train_randomly(peft_model)
    peft_model.save_pretrained(directory)
    return peft_model.eval()


@pytest.mark.parametrize("kind, targets, to_save", CASES)
def test_load_adapter_written_by_peft(tmp_path, kind, targets, to_save):
    peft_model = peft_saved(kind, targets, to_save, tmp_path)
    model = load_adapter(BUILDERS[kind](), tmp_path).eval()
    assert sorted(lora_layers(model)) == sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    torch.testing.assert_close(logits(model), logits(peft_model), **TOL)


def test_load_adapter_into_lightning_module(tmp_path):
    peft_model = peft_saved("bert", ["query", "value"], ["classifier"], tmp_path)
    module = load_adapter(shared.BertClassifier(), tmp_path).eval()
    assert sorted(lora_layers(module)) == [
        f"model.bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]
    torch.testing.assert_close(logits(module), logits(peft_model), **TOL)


def broken_copy(tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    source, target = tmp_path / "good", tmp_path / "bad"
    if not source.exists():
        peft_saved("bert", ["query", "value"], None, source)
    target.mkdir(exist_ok=True)
    config = json.loads((source / ADAPTER_CONFIG_NAME).read_text())
    tensors = load_file(source / ADAPTER_WEIGHTS_NAME)
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (target / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, target / ADAPTER_WEIGHTS_NAME)
    return target


KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"


@pytest.mark.parametrize(
    "edit_config, edit_tensors, message",
    [
        (lambda c: c.update(peft_type="IA3"), None, r"adapter_config\.json: peft_type='IA3' is not supported"),
        (lambda c: c.pop("r"), None, r"adapter_config\.json: missing config keys \['r'\]"),
        (lambda c: c.update(use_dora=True), None, r"`use_dora`=True is not supported"),
        (None, lambda t: t.pop(KEY), r"(?s)adapter_model\.safetensors does not fit BertForSequenceClassification .*missing `bert\.encoder\.layer\.0\.attention\.self\.query\.lora_B\.weight` \(model shape \(32, 4\)\)"),
        (None, lambda t: t.update({KEY.replace("query", "key"): t[KEY].clone()}), r"unexpected `bert\.encoder\.layer\.0\.attention\.self\.key\.lora_B\.weight` \(shape \(32, 4\)\)"),
        (None, lambda t: t.update({KEY: torch.zeros(32, 3)}), r"`bert\.encoder\.layer\.0\.attention\.self\.query\.lora_B\.weight` has shape \(32, 3\) in the file but \(32, 4\) in the model"),
    ],
    ids=["peft_type", "missing_config_key", "unsupported_option", "missing_tensor", "extra_tensor", "shape"],
)  # fmt: skip
def test_load_adapter_errors_name_file_key_and_shapes(tmp_path, edit_config, edit_tensors, message):
    bad = broken_copy(tmp_path, edit_config, edit_tensors)
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(shared.tiny_bert(), bad)
    assert str(bad) in str(err.value)


def test_load_adapter_refuses_pickle_only_directories(tmp_path):
    (tmp_path / ADAPTER_CONFIG_NAME).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not exist \(pickled adapter_model\.bin"):
        load_adapter(shared.tiny_bert(), tmp_path)


# -- Lightning checkpoints and the callback option ------------------------------------------------------
def test_fit_writes_peft_dir_and_checkpoint_reloads(tmp_path):
    import lightning.pytorch as pl

    module = shared.BertClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = LoRACallback(
        r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
        merge_on_fit_end=False, save_peft_dir=str(tmp_path / "peft"),
    )  # fmt: skip
    trainer = pl.Trainer(callbacks=[callback, ckpt], **shared.fit_kwargs(tmp_path, max_steps=4))
    trainer.fit(module, shared.token_loader())
    trained = logits(module.eval())
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(module).values())

    peft_model = peft.PeftModel.from_pretrained(shared.tiny_bert(), tmp_path / "peft").eval()
    assert_peft_loads_exactly(peft_model, tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model), trained, **TOL)

    restored = load_adapter_checkpoint(shared.BertClassifier(), tmp_path / "ckpt" / "last.ckpt").eval()
    torch.testing.assert_close(logits(restored), trained, **TOL)
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == {
        n for n, p in module.named_parameters() if p.requires_grad
    }  # ready to train further


def test_load_adapter_checkpoint_errors(tmp_path):
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"full\.ckpt \(.*\): it is a Lightning checkpoint without LoRA adapters"):
        load_adapter_checkpoint(shared.BertClassifier(), path)
    config = LoRAConfig(r=4, alpha=8, target_modules=["query"]).to_dict()
    torch.save({"state_dict": {}, "lora_config": config}, path)
    with pytest.raises(ValueError, match=r"full\.ckpt \(.*\): it is a LoRA checkpoint whose `state_dict` holds no adapter"):
        load_adapter_checkpoint(shared.BertClassifier(), path)
    key = "model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    torch.save({"state_dict": {key: torch.zeros(4, 32)}, "lora_config": config}, path)
    with pytest.raises(ValueError, match=r"(?s)full\.ckpt does not fit .*missing `model\.bert\.encoder\.layer\.0"):
        load_adapter_checkpoint(shared.BertClassifier(), path)


# -- merged export ----------------------------------------------------------------------------------
_FRESH_PROCESS = """
import sys, torch, transformers
assert "lightning_lora" not in sys.modules
for directory, auto in (("bert", "AutoModelForSequenceClassification"), ("gpt2", "AutoModelForCausalLM")):
    model = getattr(transformers, auto).from_pretrained(sys.argv[1] + "/" + directory).eval()
    data = torch.load(sys.argv[1] + "/" + directory + "_expected.pt", weights_only=True)
    with torch.no_grad():
        diff = (model(data["ids"]).logits - data["logits"]).abs().max().item()
    print(directory, diff)
    assert diff <= 1e-5, (directory, diff)
assert "lightning_lora" not in sys.modules
"""


def test_save_merged_loads_without_lightning_lora(tmp_path):
    for kind, targets, to_save in (("bert", ["query", "value"], ["classifier"]), ("gpt2", ["c_attn"], None)):
        model = adapted(kind, targets, to_save)
        expected = logits(model)
        save_merged(model, tmp_path / kind)
        assert lora_layers(model) and torch.equal(logits(model), expected)  # the model itself is untouched
        torch.save({"ids": ids(), "logits": expected}, tmp_path / f"{kind}_expected.pt")
        keys = load_file(tmp_path / kind / "model.safetensors")
        assert not [k for k in keys if re.search(r"lora_|base_layer|modules_to_save|original_module", k)]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_save_merged_plain_module_is_a_safetensors_state_dict(tmp_path):
    model = inject_lora(MLP(), LoRAConfig(r=2, alpha=4, target_modules=["fc1"], modules_to_save=["fc2"]))
    train_randomly(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    save_merged(model, tmp_path)
    plain = MLP()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: exactly the plain keys
    torch.testing.assert_close(plain(x), model(x), **TOL)


# -- README ------------------------------------------------------------------------------------
def test_readme_use_your_adapter_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared.tiny_bert().save_pretrained(tmp_path / "base")
    model = adapted("bert", ["query", "value"], ["classifier"])
    namespace = {"model": model, "base_dir": str(tmp_path / "base")}
    exec(shared.readme_block("Use your adapter elsewhere"), namespace)  # noqa: S102 -- our own README code
    for name in ("peft_model", "fresh", "merged"):
        torch.testing.assert_close(logits(namespace[name].eval()), logits(model), **TOL)


def test_two_peft_adapters_under_two_names_switch_tasks(tmp_path):
    from lightning_lora.adapters import list_adapters, set_active_adapter

    first = peft_saved("bert", ["query", "value"], ["classifier"], tmp_path / "first")
    torch.manual_seed(7)
    second = peft.get_peft_model(
        shared.tiny_bert(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    with torch.no_grad():
        for param in second.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    second.save_pretrained(tmp_path / "second")

    model = load_adapter(shared.tiny_bert(), tmp_path / "first", adapter_name="first")
    load_adapter(model, tmp_path / "second", adapter_name="second")
    assert list_adapters(model) == ["first", "second"]
    torch.testing.assert_close(logits(model), logits(first), **TOL)
    set_active_adapter(model, "second")
    torch.testing.assert_close(logits(model), logits(second.eval()), **TOL)
