"""Multi-node launch the Lightning way: two torchrun "nodes" x 1 process on this machine, gloo over 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("multinode_fit.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_end_with_identical_adapters_and_one_adapter_only_checkpoint(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), str(SCRIPT),
             str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    rank0 = torch.load(tmp_path / "adapters_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "adapters_rank1.pt", weights_only=True)
    assert set(rank0) == set(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k)
    checkpoints = list((tmp_path / "ckpt").iterdir())
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    assert set(state) == set(rank0)
