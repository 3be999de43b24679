"""A training run SIGKILLed at random moments resumes to the same adapter, bit for bit, from a last.ckpt that loads.

The checkpoint folder is on another filesystem than ``$TMPDIR`` (``/dev/shm`` vs the disk the
tests run on): there, Lightning's default checkpoint IO moves its temporary file by copying it,
and a kill can leave a truncated ``last.ckpt``. ``LoRACallback`` installs ``AtomicCheckpointIO``,
so it cannot. Three processes are killed in turn — mid-epoch, at an epoch end, inside a save —
each resuming from ``last.ckpt`` of the one before; a fourth finishes. Its adapter must equal an
uninterrupted run's (``torch.equal``), and no temporary file may be left anywhere.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from kill_fit import BATCHES_PER_EPOCH, EVERY_N_STEPS, run

SCRIPT = Path(__file__).with_name("kill_fit.py")
SHM = Path("/dev/shm")


@pytest.fixture
def ckpt_dir(tmp_path):
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary folder")
    folder = Path(tempfile.mkdtemp(dir=SHM, prefix="lightning-lora-kill-"))
    yield folder / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)


def start(ckpt: Path, out: Path, tmpdir: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(SCRIPT.parent)}
    args = [sys.executable, str(SCRIPT), str(ckpt), str(out)] + (["--resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def kill_when(proc: subprocess.Popen, should_kill) -> list[str]:
    """Read the child's lines until ``should_kill(line)`` is true, then SIGKILL it; return the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if should_kill(line.split()):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "\n".join(lines[-30:])  # killed, not finished or crashed
    return lines


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.exists() else []


def saving(ckpt: Path, tmpdir: Path) -> list[str]:
    """Temporary files of a save in progress: ours beside the checkpoints, Lightning's default writer's in $TMPDIR."""
    return temp_files(ckpt) + [p.name for p in tmpdir.iterdir()]


def inside_a_save(ckpt: Path, tmpdir: Path, rng: random.Random):
    """Kill right after a temporary checkpoint file appears (plus 0-5 ms): the process is writing it."""

    def should_kill(event: list[str]) -> bool:
        if event[:1] != ["save"]:
            return False
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if saving(ckpt, tmpdir):
                time.sleep(rng.uniform(0, 0.005))
                return True
            time.sleep(0.0005)
        return False  # that save finished before we saw it: wait for the next one

    return should_kill


def assert_last_loads(ckpt: Path, lines: list[str]) -> None:
    last = ckpt / "last.ckpt"
    if last.exists():
        checkpoint = torch.load(last, weights_only=True)
        assert "lora_config" in checkpoint and checkpoint["state_dict"], "\n".join(lines[-10:])


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, ckpt_dir):
    seed = int(os.environ.get("KILL_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "final.pt"
    mid_epoch_step = rng.choice([s for s in range(EVERY_N_STEPS + 1, BATCHES_PER_EPOCH) if s % EVERY_N_STEPS])
    moments = [
        ("mid-epoch", lambda e: e == ["batch", str(mid_epoch_step)]),
        ("epoch end", lambda e: e[:1] == ["epoch_end"]),
        ("inside a save", inside_a_save(ckpt_dir, tmpdir, rng)),
    ]
    for i, (moment, should_kill) in enumerate(moments):
        lines = kill_when(start(ckpt_dir, out, tmpdir, resume=i > 0), should_kill)
        assert (ckpt_dir / "last.ckpt").exists(), (moment, seed, lines[-10:])
        assert_last_loads(ckpt_dir, lines)
        if moment == "inside a save":
            assert saving(ckpt_dir, tmpdir), f"the kill was meant to hit a save in progress (seed {seed})"

    final = start(ckpt_dir, out, tmpdir, resume=True)
    output, _ = final.communicate(timeout=120)
    assert final.returncode == 0 and output.rstrip().endswith("done"), output[-3000:]
    assert temp_files(ckpt_dir) == [], "the resumed run leaves no temporary file of a killed save"
    assert list(tmpdir.iterdir()) == [], "nothing is written to $TMPDIR"
    assert_last_loads(ckpt_dir, [])

    resumed = torch.load(out, weights_only=True)
    reference = run(tmp_path / "reference", None)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), (key, seed)
