"""LoRACallback under Lightning's sharded strategies: FSDP2 (ModelParallelStrategy) on CPU with gloo, FSDP1 on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader

from lightning_lora.strategies import LoRAFSDPStrategy, check_resume_supported

SCRIPT = Path(__file__).with_name("fsdp_fit.py")


def run(out: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def check_exact_resume(tmp_path: Path, *args: str) -> dict[str, torch.Tensor]:
    run(tmp_path, *args, "full")
    full = torch.load(tmp_path / "adapters_full.pt", weights_only=True)
    assert all(".lora_" in k or ".modules_to_save." in k for k in full)
    assert all(full[k].abs().sum() > 0 for k in full if "lora_B" in k)
    run(tmp_path, *args, "resume")
    resumed = torch.load(tmp_path / "adapters_resume.pt", weights_only=True)
    assert set(resumed) == set(full)
    for key in full:
        assert torch.equal(resumed[key], full[key]), key
    return full


def test_fsdp2_shards_base_and_adapters_writes_adapter_only_shards_and_resumes_exactly(tmp_path):
    full = check_exact_resume(tmp_path, "fsdp2", "sharded")
    # sharded over 2 ranks on dim 0: frozen base and trainable adapters alike
    params = json.loads((tmp_path / "params_full.json").read_text())
    embed = params["model.bert.embeddings.word_embeddings.weight"]
    assert embed == [[50, 32], [100, 32], False]
    lora_b = params["model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert lora_b == [[16, 4], [32, 4], True]
    assert {n for n, (_, _, grad) in params.items() if grad} == set(full)
    # the distributed checkpoint holds the adapter shards and the optimizer state only
    keys = set(FileSystemReader(str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}
    assert model_keys == set(full)
    assert {k for k in keys if not k.startswith(("state_dict.", "optimizer_0."))} == set()


def test_stock_sharded_strategies_refuse_to_resume_adapter_only_checkpoints_with_the_fix():
    check_resume_supported(ModelParallelStrategy(), None)  # no resume: fine
    with pytest.raises(ValueError, match="LoRAModelParallelStrategy"):
        check_resume_supported(ModelParallelStrategy(), "last.ckpt")
    with pytest.raises(ValueError, match="LoRAFSDPStrategy"):
        check_resume_supported(FSDPStrategy(), "last.ckpt")


def test_lora_fsdp_strategy_options():
    assert LoRAFSDPStrategy().kwargs["use_orig_params"] is True
    with pytest.raises(ValueError, match="use_orig_params=True"):
        LoRAFSDPStrategy(use_orig_params=False)
    with pytest.raises(ValueError, match="LoRAModelParallelStrategy"):
        LoRAFSDPStrategy(state_dict_type="sharded")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="PyTorch's FSDP1 needs accelerators; this test needs 2 GPUs")
def test_fsdp1_single_file_adapter_checkpoints_resume_exactly(tmp_path):
    check_exact_resume(tmp_path, "fsdp1", "single")
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    assert all(".lora_" in k or ".modules_to_save." in k for k in state)
