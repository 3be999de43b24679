"""``AtomicCheckpointIO`` and ``atomic_write``: durable, all-or-nothing files; stale temporary files removed;
installed by ``LoRACallback`` only in place of Lightning's default."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lora_test_modules import BertClassifier, fit_kwargs, tiny_bert, token_loader

import lightning_lora.checkpoint_io as checkpoint_io
from lightning_lora import AtomicCheckpointIO, LoRACallback, inject_lora, LoRAConfig, save_adapter, save_merged
from lightning_lora.checkpoint_io import atomic_write, remove_stale_temps, temp_path_for


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_save_is_fsynced_renamed_and_leaves_no_temp(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))), real_replace(a, b)))
    target = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5.0)}}, target)

    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.arange(5.0))
    (temp, final), = renames
    assert final == str(target) and os.path.dirname(temp) == str(target.parent)  # renamed within the folder
    assert synced[0] == temp and synced[-1] == str(target.parent)  # the file's data, then the folder's entry
    assert temps(target.parent) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails half-way
        io.save_checkpoint({"step": 2, "bad": lambda: None}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert temps(tmp_path) == []


def test_stale_temps_of_dead_processes_are_removed_on_first_save(tmp_path):
    dead = subprocess_pid_that_exited()
    stale = temp_path_for(tmp_path / "last.ckpt").name.replace(f"-{os.getpid()}-", f"-{dead}-")
    (tmp_path / stale).write_bytes(b"partial")
    live = temp_path_for(tmp_path / "other.ckpt").name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-")
    (tmp_path / live).write_bytes(b"another run is writing this")
    foreign = f".x.ckpt.tmp-otherhost-{dead}-abcd"
    (tmp_path / foreign).write_bytes(b"another host")
    (tmp_path / "user.tmp-file").write_bytes(b"not ours")

    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live, foreign, "user.tmp-file"])
    assert remove_stale_temps(tmp_path) == []


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_error_removes_its_temp(tmp_path):
    def write(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a.bin", write)
    assert (tmp_path / "a.bin").read_bytes() == b"old" and temps(tmp_path) == []


def test_remote_paths_use_lightnings_writer(monkeypatch):
    calls = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", lambda self, c, p, storage_options=None: calls.append(p))
    monkeypatch.setattr(checkpoint_io, "atomic_write", lambda *a: pytest.fail("local writer used for a remote path"))
    AtomicCheckpointIO().save_checkpoint({"step": 1}, "memory://bucket/last.ckpt")
    assert calls == ["memory://bucket/last.ckpt"]
    # and a real round trip through fsspec's in-memory filesystem
    monkeypatch.undo()
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3}, "memory://bucket/last.ckpt")
    assert io.load_checkpoint("memory://bucket/last.ckpt") == {"step": 3}


def trainer_with(tmp_path, callback, **kwargs):
    trainer = pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path, max_steps=1, enable_checkpointing=False), **kwargs)
    trainer.fit(BertClassifier(), token_loader(n=8))
    return trainer


LORA = dict(r=4, target_modules=["query", "value"], merge_on_fit_end=False)


def test_callback_installs_atomic_io_unless_opted_out(tmp_path):
    assert isinstance(trainer_with(tmp_path, LoRACallback(**LORA)).strategy.checkpoint_io, AtomicCheckpointIO)
    opted_out = trainer_with(tmp_path, LoRACallback(**LORA, atomic_checkpoints=False))
    assert type(opted_out.strategy.checkpoint_io) is TorchCheckpointIO


def test_callback_leaves_a_user_plugin_alone_with_one_info_line(tmp_path, caplog):
    class MyIO(TorchCheckpointIO):
        pass

    mine = MyIO()
    callback = LoRACallback(**LORA)
    with caplog.at_level(logging.INFO):
        trainer = trainer_with(tmp_path, callback, plugins=[mine])
        trainer.validate(trainer.lightning_module, token_loader(n=8), verbose=False)  # setup runs again
    assert trainer.strategy.checkpoint_io is mine
    notes = [r.getMessage() for r in caplog.records if "AtomicCheckpointIO" in r.getMessage()]
    assert len(notes) == 1 and "MyIO" in notes[0]


def test_callback_gives_async_io_an_atomic_base(tmp_path):
    trainer = trainer_with(tmp_path, LoRACallback(**LORA), plugins=[AsyncCheckpointIO()])
    assert isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO)
    assert isinstance(trainer.strategy.checkpoint_io.checkpoint_io, AtomicCheckpointIO)


def test_adapter_and_merged_exports_replace_files_atomically(tmp_path, monkeypatch):
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, target_modules=["query", "value"]))
    save_adapter(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    # a save killed half-way leaves the old files and a temporary one; the next save removes it
    dead = subprocess_pid_that_exited()
    stale = temp_path_for(tmp_path / "adapter" / "adapter_model.safetensors").name.replace(f"-{os.getpid()}-", f"-{dead}-")
    (tmp_path / "adapter" / stale).write_bytes(before[:100])
    with pytest.raises(RuntimeError, match="boom"):
        monkeypatch.setattr("lightning_lora.io.safetensors_bytes", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    save_merged(model, tmp_path / "merged")
    save_merged(model, tmp_path / "merged")  # over an existing export
    assert "model.safetensors" in {p.name for p in (tmp_path / "merged").iterdir()}
    assert temps(tmp_path) == [] and temps(tmp_path / "merged") == []
