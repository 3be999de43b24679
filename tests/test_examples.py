"""examples/existing_module.py (the README's example for an existing LightningModule), run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lora_test_modules as shared
import torch
from transformers import AutoModelForSequenceClassification

from lightning_lora import lora_layers

EXAMPLE = Path(__file__).parents[1] / "examples" / "existing_module.py"


def test_existing_module_example_trains_saves_adapter_only_and_merged(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max_epochs", "3", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trainable: 4,226 of" in result.stdout
    assert "adapter-only checkpoint" in result.stdout

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_" in k or ".modules_to_save." in k for k in checkpoint["state_dict"])
    assert checkpoint["lora_config"]["target_modules"] == ["query", "value"]

    # The merged export is a plain transformers model whose weights carry what LoRA learned.
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    head = checkpoint["state_dict"]["model.classifier.modules_to_save.weight"]
    assert torch.equal(merged.classifier.weight, head)


def test_readme_outside_lightning_block_runs():
    model = shared.tiny_llama()
    ids = torch.randint(1, shared.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    namespace = {"model": model}
    exec(shared.readme_block("Outside Lightning"), namespace)  # noqa: S102 -- our own README code
    state = namespace["state"]
    assert sorted({k.rsplit(".", 3)[-3] for k in state}) == ["q_proj", "v_proj"]
    assert len(state) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert not lora_layers(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():  # nothing was trained in the snippet (B = 0): the merged model is the base model
        assert torch.allclose(model(ids).logits, base, atol=1e-6)
