"""Damaged and wrong-kind files, on every reading path: one ``CheckpointError`` naming the file, its size,
what is wrong, and the checkpoints beside it that do load (newest first); ``resume_fallback`` opts in to
resuming from the newest of them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import BertClassifier, fit_kwargs, tiny_bert, token_loader

from lightning_lora import (
    AtomicCheckpointIO,
    CheckpointError,
    LoRACallback,
    LoRAConfig,
    inject_lora,
    load_adapter,
    load_adapter_checkpoint,
    save_adapter,
)

LORA = dict(r=4, alpha=8, target_modules=["query", "value"], merge_on_fit_end=False)
GOOD = ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]  # oldest first


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished run's checkpoint folder: two adapter-only checkpoints and last.ckpt, with fixed ages."""
    root = tmp_path_factory.mktemp("run")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(callbacks=[LoRACallback(**LORA), checkpoint], **fit_kwargs(root, max_steps=4))
    trainer.fit(BertClassifier(), token_loader(n=32))
    for age, name in enumerate(reversed(GOOD + ["last.ckpt"])):
        os.utime(root / "ckpt" / name, (1e9 - age * 100, 1e9 - age * 100))
    return root / "ckpt"


@pytest.fixture
def folder(run_folder, tmp_path):
    return shutil.copytree(run_folder, tmp_path / "ckpt")


def damage(path, kind):
    """Turn ``path`` into a damaged or wrong-kind file; return the phrase its error must contain."""
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
        return "the file is empty"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return "the file is truncated"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
        return "not a PyTorch checkpoint"
    if kind == "not_lightning":
        torch.save({"weights": torch.ones(3)}, path)
        return "not a Lightning checkpoint"
    if kind == "no_adapters":
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" not in k}
        checkpoint.pop("lora_config")
        torch.save(checkpoint, path)
        return "without"  # "...without adapter tensors" / "...without LoRA adapters"
    raise AssertionError(kind)


KINDS = ["empty", "truncated", "random", "not_lightning", "no_adapters"]


def assert_names_file_and_alternatives(message, path, phrase):
    assert f"{path} (" in message and ("bytes)" in message or "(empty)" in message), message
    assert phrase in message, message
    listed = message.split("newest first: ", 1)[1]
    assert listed.index(GOOD[1]) < listed.index(GOOD[0]), message  # newest first
    assert path.name not in listed


def resume(tmp_path, folder, ckpt_path, **callback_kwargs):
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(callbacks=[LoRACallback(**LORA, **callback_kwargs), checkpoint], **fit_kwargs(tmp_path, max_steps=6))
    trainer.fit(BertClassifier(), token_loader(n=32), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic_io", "lightning_io"])
@pytest.mark.parametrize("kind", KINDS)
def test_fit_from_damaged_checkpoint_names_it(tmp_path, folder, kind, atomic):
    path = folder / "last.ckpt"
    phrase = damage(path, kind)
    with pytest.raises(CheckpointError) as err:
        resume(tmp_path, folder, str(path), atomic_checkpoints=atomic)
    assert_names_file_and_alternatives(str(err.value), path, phrase)
    assert "resume_fallback=True" in str(err.value)


def test_last_with_damaged_last_ckpt_is_an_error_not_a_fallback(tmp_path, folder):
    damage(folder / "last.ckpt", "truncated")
    with pytest.raises(CheckpointError, match=r"last\.ckpt .*truncated"):
        resume(tmp_path, folder, "last")


def test_resume_fallback_resumes_from_the_newest_checkpoint_that_loads(tmp_path, folder, caplog):
    damage(folder / "last.ckpt", "truncated")
    damage(folder / GOOD[1], "random")  # the newest real one is damaged too: step 2 is the one that loads
    with caplog.at_level(logging.WARNING):
        trainer = resume(tmp_path, folder, "last", resume_fallback=True)
    assert trainer.ckpt_path == str(folder / GOOD[0]) and trainer.global_step == 6
    (note,) = [r.getMessage() for r in caplog.records if "resume_fallback" in r.getMessage()]
    assert f"Resuming from {folder / GOOD[0]}" in note and "last.ckpt" in note and "truncated" in note
    # it really resumed from step 2: the same adapter as resuming from that file by name
    reference = resume(tmp_path / "ref", shutil.copytree(folder, tmp_path / "ref_ckpt"), str(folder / GOOD[0]))
    fallback_state, reference_state = trainer.lightning_module.state_dict(), reference.lightning_module.state_dict()
    assert all(torch.equal(fallback_state[k], reference_state[k]) for k in reference_state if ".lora_" in k)


@pytest.mark.parametrize("kind", KINDS)
def test_load_adapter_checkpoint_names_damaged_file(folder, kind):
    path = folder / GOOD[1]
    phrase = damage(path, kind)
    os.utime(path, (2e9, 2e9))
    with pytest.raises(CheckpointError) as err:
        load_adapter_checkpoint(BertClassifier(), path)
    message = str(err.value)
    assert f"{path} (" in message and phrase in message, message
    listed = message.split("newest first: ", 1)[1]
    assert listed.index("last.ckpt") < listed.index(GOOD[0]) and GOOD[1] not in listed


@pytest.mark.parametrize("kind", KINDS[:3])
def test_atomic_io_load_names_damaged_file(folder, kind):
    path = folder / "last.ckpt"
    phrase = damage(path, kind)
    with pytest.raises(CheckpointError) as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert_names_file_and_alternatives(str(err.value), path, phrase)


@pytest.fixture
def adapters(tmp_path):
    """Two PEFT adapter folders side by side, ``b`` newer."""
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, target_modules=["query", "value"]))
    for name in ("a", "b"):
        save_adapter(model, tmp_path / name)
    return tmp_path


def damage_safetensors(path, kind):
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    if kind == "empty":
        path.write_bytes(b"")
        return "the file is empty"
    if kind == "truncated":
        path.write_bytes(data[: 8 + header_len + 10])
        return "the file is truncated: its tensors need"
    if kind == "truncated_header":
        path.write_bytes(data[: 8 + header_len // 2])
        return "the file is truncated: its header alone should be"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
        return "no safetensors file has"
    if kind == "bad_header":
        path.write_bytes(data[:8] + b"\xff" * header_len + data[8 + header_len :])
        return "header is not valid JSON"
    if kind == "foreign":
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.ones(2)}, str(path))
        return "not a PEFT LoRA adapter: key `encoder.weight`"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "truncated", "truncated_header", "random", "bad_header", "foreign"])
def test_load_adapter_names_damaged_safetensors(adapters, kind):
    path = adapters / "b" / "adapter_model.safetensors"
    phrase = damage_safetensors(path, kind)
    with pytest.raises(CheckpointError) as err:
        load_adapter(tiny_bert(), adapters / "b")
    message = str(err.value)
    assert f"{path} (" in message and phrase in message, message
    assert f"that do load, newest first: {os.path.join('a', 'adapter_model.safetensors')}" in message


def test_load_adapter_names_damaged_config(adapters):
    path = adapters / "b" / "adapter_config.json"
    path.write_text(json.dumps({"r": 4})[:-3])
    with pytest.raises(CheckpointError, match=r"(?s)b/adapter_config\.json \(\d+ bytes\): it is not valid JSON.*a/adapter"):
        load_adapter(tiny_bert(), adapters / "b")


class TokenData(pl.LightningDataModule):
    """The tests' token data as a datamodule, for the CLI."""

    def train_dataloader(self):
        return token_loader(n=32)


def test_cli_ckpt_path_names_damaged_file_or_falls_back(tmp_path, folder, capsys, caplog):
    from lightning_lora.cli import main

    path = folder / "last.ckpt"
    damage(path, "truncated")
    args = ["fit", "--model", "lora_test_modules.BertClassifier", "--data", f"{__name__}.TokenData",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.max_steps", "6",
            "--lora.r", "4", "--lora.target_modules", "[query, value]", "--ckpt_path", str(path)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"lightning-lora: error: {path} (" in err and "truncated" in err and GOOD[1] in err, err[-2000:]
    with caplog.at_level(logging.WARNING):
        assert main(args + ["--lora.resume_fallback", "true"]) == 0
    assert any(f"Resuming from {folder / GOOD[1]}" in r.getMessage() for r in caplog.records)
