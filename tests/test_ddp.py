"""LoRACallback under Lightning's DDP strategy on CPU (two processes, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def run(out: Path, phase: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), phase], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_ddp_trains_writes_adapter_only_checkpoints_and_resumes(tmp_path):
    run(tmp_path, "full")
    full = torch.load(tmp_path / "adapters_full.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(full)
    assert all(".lora_" in k or ".modules_to_save." in k for k in full)
    assert all(full[k].abs().sum() > 0 for k in full if "lora_B" in k)

    run(tmp_path, "resume")
    resumed = torch.load(tmp_path / "adapters_resume.pt", weights_only=True)
    for key in full:
        assert torch.equal(resumed[key], full[key]), key
