"""lightning_lora.probe: gradient scores, budget-fitting choice of targets and r, the `lora:` YAML and the CLI flag."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lora_test_modules import BertClassifier, token_loader
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_layers
from lightning_lora.cli import main as cli_main
from lightning_lora.probe import KindScore, choose_targets, score_modules, suggest_targets


class TwoBranch(nn.Module):
    """y = live(x) + 0 · dead(x): the dead branch cannot lower the loss, the live one can."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.live = nn.Linear(6, 3)
        self.dead = nn.Linear(6, 3)

    def forward(self, x):
        return self.live(x) + 0.0 * self.dead(x)


def _mse_step(model, batch, i):
    x, t = batch
    return 0.5 * (model(x) - t).square().sum()


def test_score_is_the_gradient_of_b_at_zero():
    model = TwoBranch()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(3)]
    kinds = {k.kind: k for k in score_modules(model, batches, candidates=["live", "dead"], probe_r=2, seed=7, step_fn=_mse_step)}
    assert kinds["dead"].score == 0.0 and kinds["live"].score > 0
    assert kinds["live"].cost_per_rank == 6 + 3
    # independent: ∂L/∂B = s · Σ_n (y_n − t_n)(A x_n)ᵀ at B = 0, with the probe's seeded A
    reference = TwoBranch()
    torch.manual_seed(7)
    inject_lora(reference, LoRAConfig(r=2, target_modules=["live", "dead"]))
    layer = lora_layers(reference)["live"]
    a, s = layer.lora_A.weight.detach(), layer.scaling
    expected = 0.0
    for x, t in batches:
        residual = reference.live.base_layer(x).detach() - t
        expected += float((s * residual.T @ (x @ a.T)).square().sum())
    assert kinds["live"].score == pytest.approx(expected / 3, rel=1e-5)
    assert all(p.grad is None for p in model.parameters()) and not lora_layers(model)  # the user's model is untouched


def test_suggestion_fits_budget_and_yaml_round_trips():
    module = BertClassifier()
    base = LoRAConfig(r=8, alpha=16, dropout=0.1, modules_to_save=["classifier"])
    suggestion = suggest_targets(module, token_loader(n=16, batch_size=8), budget=2000, base=base, num_batches=2)
    assert 0 < suggestion.trainable_params <= 2000 and suggestion.chosen
    # the YAML block is valid and selects exactly the chosen modules with the promised parameter count
    block = yaml.safe_load(suggestion.yaml())["lora"]
    config = LoRAConfig(**{k: v for k, v in block.items()})
    assert config.alpha == 2 * config.r and config.modules_to_save == ["classifier"] and config.dropout == 0.1
    fresh = BertClassifier()
    inject_lora(fresh, config)
    chosen = {n for k in suggestion.kinds if k.kind in suggestion.chosen for n in k.modules}
    assert set(lora_layers(fresh)) == chosen
    adapters = sum(p.numel() for layer in lora_layers(fresh).values() for _, p in layer.adapter_parameters())
    assert adapters == suggestion.trainable_params
    assert "chosen" in suggestion.table() and "classifier" not in "".join(k.kind for k in suggestion.kinds)


def test_choose_targets_rule():
    kinds = [KindScore("l.value", ["l.0.value"], 8.0, 10), KindScore("l.query", ["l.0.query"], 1.0, 10),
             KindScore("l.key", ["l.0.key"], 1.0, 10)]  # fmt: skip
    wide = choose_targets(kinds, budget=1000, coverage=0.85)
    assert wide.chosen == ["l.value", "l.query"] and wide.r == 50 and wide.trainable_params == 1000
    assert re.fullmatch(wide.target_modules, "l.7.query") and not re.fullmatch(wide.target_modules, "l.7.key")
    narrow = choose_targets(kinds, budget=30, coverage=0.85, r_min=2)  # 20 per rank would give r=1 < r_min
    assert narrow.chosen == ["l.value"] and narrow.r == 3
    with pytest.raises(ValueError, match="too small.*`value` needs 10"):
        choose_targets(kinds, budget=5)
    with pytest.raises(ValueError, match="budget"):
        suggest_targets(BertClassifier(), [], budget=0)


class TokenData(pl.LightningDataModule):
    def train_dataloader(self):
        return token_loader(n=16, batch_size=8)


def test_cli_suggest_targets_prints_lora_block(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lora_test_modules.BertClassifier"},
        "data": {"class_path": "test_probe.TokenData"},
        "trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path)},
        "lora": {"r": 4, "alpha": 8, "modules_to_save": ["classifier"]},
    }))  # fmt: skip
    argv = ["analyze", "--suggest_targets", "true", "--budget", "3000", "--fit_config", str(config), "--num_batches", "2"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    block = yaml.safe_load(out[out.index("# suggested") :])["lora"]
    assert block["r"] >= 1 and block["modules_to_save"] == ["classifier"]
    assert cli_main(["analyze", "--suggest_targets", "true", "--fit_config", str(config)]) == 2
    assert "needs --budget" in capsys.readouterr().err
