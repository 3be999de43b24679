"""`lightning-lora analyze`: reading adapters (checkpoint, PEFT dir), base weights, JSON/CSV/PNG output, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from lora_test_modules import BertClassifier, tiny_bert, tiny_gpt2

from lightning_lora import LoRAConfig, adapter_state_dict, inject_lora, lora_layers, save_adapter
from lightning_lora.analysis import analyze_model
from lightning_lora.cli import main as cli_main
from lightning_lora.commands.analyze import base_weights, read_adapter
from lightning_lora.io import CHECKPOINT_CONFIG_KEY


def _trained_like(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter factor random values, as after training (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for _, param in layer.adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def _checkpoint(tmp_path, name: str, r: int, seed: int, targets=("query", "value")) -> tuple[str, BertClassifier]:
    """An adapter-only checkpoint as LoRACallback writes it (state_dict of adapter tensors + lora_config)."""
    module = BertClassifier()
    config = LoRAConfig(r=r, alpha=2 * r, target_modules=list(targets), modules_to_save=["classifier"])
    inject_lora(module, config)
    _trained_like(module, seed)
    path = tmp_path / name
    torch.save({"state_dict": adapter_state_dict(module), CHECKPOINT_CONFIG_KEY: config.to_dict()}, path)
    return str(path), module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_bert().save_pretrained(str(path))  # the same weights as BertClassifier() (seed 0)
    return str(path)


def test_cli_writes_json_csv_and_pngs(tmp_path, base_dir, capsys):
    ckpt, module = _checkpoint(tmp_path, "r4.ckpt", r=4, seed=1)
    other, _ = _checkpoint(tmp_path, "r8.ckpt", r=8, seed=2)
    out = tmp_path / "analysis"
    code = cli_main(["analyze", "--adapter", ckpt, "--compare_to", other, "--base", base_dir, "--output_dir", str(out)])
    assert code == 0
    for name in ("analysis.json", "analysis.csv", "similarity.csv", "spectra.png", "norm_ratio.png", "subspace_similarity.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "analysis.json").read_text())
    # the numbers from files and base folder equal the in-memory analysis of the same module
    expected = {r.name: r for r in analyze_model(module)}
    assert len(data["modules"]) == 4 and set(expected) == {m["name"] for m in data["modules"]}
    for m in data["modules"]:
        ref = expected[m["name"]]
        assert m["delta_norm"] == pytest.approx(ref.delta_norm, rel=1e-6)
        assert m["weight_norm"] == pytest.approx(ref.weight_norm, rel=1e-6)
        assert m["amplification"]["factor"] == pytest.approx(ref.amplification.factor, rel=1e-5)
        assert m["r"] == 4 and len(m["singular_values"]) == 4
    grid = data["similarity"]["model.bert.encoder.layer.0.attention.self.query"]
    assert len(grid) == 4 and len(grid[0]) == 8
    rows = list(csv.DictReader((out / "analysis.csv").open()))
    assert {row["name"] for row in rows} == set(expected) and rows[0]["amplification_factor"]
    assert "attention.self.query" in capsys.readouterr().out  # the Rich table


def test_peft_dir_without_base_and_gpt2_conv1d_layout(tmp_path):
    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(r=2, target_modules=["c_attn", "c_proj"]))
    _trained_like(model, 3)
    save_adapter(model, tmp_path / "adapter")
    model_dir = tmp_path / "gpt2"
    base = tiny_gpt2()
    base.save_pretrained(str(model_dir))
    adapter = read_adapter(tmp_path / "adapter")
    weights = base_weights(adapter, base, "gpt2")  # c_proj is 32×32: the layout must come from the Conv1D type
    expected = {r.name: r for r in analyze_model(model)}
    from lightning_lora.commands.analyze import analyze_adapter

    for report in analyze_adapter(adapter, weights):
        ref = expected[report.name]
        assert report.amplification.projection_delta == pytest.approx(ref.amplification.projection_delta, rel=1e-5)
    out = tmp_path / "out"
    assert cli_main(["analyze", "--adapter", str(tmp_path / "adapter"), "--base", "none", "--output_dir", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["base"] is None and all(m["weight_norm"] is None for m in data["modules"])


def test_errors_name_the_problem(tmp_path, base_dir, capsys):
    ckpt, _ = _checkpoint(tmp_path, "qv.ckpt", r=4, seed=1)
    query_only, _ = _checkpoint(tmp_path, "q.ckpt", r=4, seed=1, targets=("query",))
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_CONFIG_KEY: LoRAConfig().to_dict()}, empty)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": tiny_bert().state_dict()}, full)
    wide = tmp_path / "wide"
    tiny_bert(hidden_size=48, num_attention_heads=4).save_pretrained(str(wide))

    def run(*argv) -> str:
        assert cli_main(["analyze", *argv, "--output_dir", str(tmp_path / "o")]) == 2
        return capsys.readouterr().err

    assert "only in the first: ['model.bert.encoder.layer.0.attention.self.value'" in run(
        "--adapter", ckpt, "--compare_to", query_only, "--base", "none")
    assert "holds no LoRA adapter tensors" in run("--adapter", str(empty), "--base", "none")
    assert "no `lora_config` entry" in run("--adapter", str(full))
    err = run("--adapter", ckpt, "--base", str(wide))
    assert "`model.bert.encoder.layer.0.attention.self.query`" in err and "(32, 32)" in err and "(48, 48)" in err
    assert "neither a Lightning checkpoint file nor a PEFT adapter directory" in run("--adapter", str(tmp_path))
    assert "give --adapter" in run()
