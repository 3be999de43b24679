"""The `lightning-lora` command on a tiny from-config BERT and few-row GLUE fixtures: fit, validate, resume,
CLI optimizers, export, inspect, every shipped config, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import lora_test_modules as shared
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from lightning_lora import LoRACallback, lora_layers
from lightning_lora.cli import EXTRA_COMMANDS, LoRACLI, main
from lightning_lora.commands.inspect_cmd import inspect_config
from lightning_lora.data import GLUEDataModule
from lightning_lora.io import load_adapter_checkpoint
from lightning_lora.models import SequenceClassificationModule

ROOT = Path(__file__).parents[1]
SST2 = Path(__file__).parent / "data" / "glue" / "SST-2"
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return shared.tiny_bert_classifier_dir(tmp_path_factory.mktemp("tiny_bert"))


def config(tmp_path: Path, tiny_dir: str, name: str = "config.yaml", **trainer) -> str:
    """A fit config in the style of configs/glue, on the tiny BERT and the SST-2 fixture (8 rows, 4 per batch)."""
    values = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "default_root_dir": str(tmp_path), "logger": False, "deterministic": True,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0}}],
            **trainer,
        },
        "model": {"class_path": "lightning_lora.models.SequenceClassificationModule",
                  "init_args": {"model_name_or_path": tiny_dir, "task_name": "sst2"}},
        "data": {"class_path": "lightning_lora.data.GLUEDataModule",
                 "init_args": {"task_name": "sst2", "data_dir": str(SST2), "model_name_or_path": tiny_dir,
                               "max_length": 32, "batch_size": 4}},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        # A constant learning rate: the module's own schedule depends on max_steps, which a resume test varies.
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}},
    }  # fmt: skip
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def adapter_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir) -> Path:
    """An uninterrupted CLI fit of 4 steps (2 epochs); its folder holds ckpt/last.ckpt."""
    tmp_path = tmp_path_factory.mktemp("fit")
    assert main(["fit", "--config", config(tmp_path, tiny_dir, max_steps=4)]) == 0
    return tmp_path


def test_fit_leaves_an_adapter_only_checkpoint_and_prints_the_dev_metrics(trained, tiny_dir, capsys, tmp_path):
    state = adapter_state(trained / "ckpt" / "last.ckpt")
    assert state and all(".lora_" in k or ".modules_to_save." in k for k in state)
    assert len([k for k in state if ".lora_" in k]) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # trained
    # `validate --ckpt_path` scores the checkpoint's adapter: equal to loading it by hand.
    cli = LoRACLI(args=["validate", "--config", config(tmp_path, tiny_dir), "--ckpt_path", str(trained / "ckpt" / "last.ckpt")])
    module = load_adapter_checkpoint(SequenceClassificationModule(tiny_dir, task_name="sst2"), trained / "ckpt" / "last.ckpt")
    data = GLUEDataModule("sst2", str(SST2), tiny_dir, max_length=32, batch_size=4)
    expected = pl.Trainer(**shared.fit_kwargs(tmp_path)).validate(module, data, verbose=False)[0]
    assert {k: float(v) for k, v in cli.trainer.callback_metrics.items()} == pytest.approx(expected, abs=1e-6)
    assert set(expected) == {"val/accuracy", "val/loss"}


def test_resume_with_ckpt_path_equals_the_uninterrupted_run(trained, tiny_dir, tmp_path, capsys):
    assert main(["fit", "--config", config(tmp_path, tiny_dir, max_steps=2)]) == 0
    first_half = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(first_half, weights_only=True)["global_step"] == 2
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    assert main(["fit", "--config", config(resumed, tiny_dir, max_steps=4), "--ckpt_path", str(first_half)]) == 0
    assert "Validation after fit: val/accuracy=" in capsys.readouterr().out
    uninterrupted, resumed_state = adapter_state(trained / "ckpt" / "last.ckpt"), adapter_state(resumed / "ckpt" / "last.ckpt")
    assert uninterrupted.keys() == resumed_state.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed_state[key], uninterrupted[key], rtol=0, atol=0, msg=key)


class OptimizerProbe(pl.Callback):
    """Records, when training starts, which parameters the optimizer holds and which require grad."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer = trainer.optimizers[0]
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        self.trainable = {name: id(p) for name, p in pl_module.named_parameters() if p.requires_grad}
        self.all = {id(p) for p in pl_module.parameters()}
        self.lrs = {g["lr"] for g in self.optimizer.param_groups}


def test_cli_optimizer_and_scheduler_hold_exactly_the_trainable_parameters(tmp_path, tiny_dir):
    cli = LoRACLI(
        args=["--config", config(tmp_path, tiny_dir, max_steps=2), "--lora.r", "2",
              "--optimizer", "SGD", "--optimizer.lr", "0.5", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"],
        run=False,
    )  # fmt: skip
    probe = OptimizerProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.in_optimizer == set(probe.trainable.values())  # the adapters and the head; no frozen weight
    assert len(probe.all) > len(probe.in_optimizer)
    assert sorted({n.split(".")[-2] for n in probe.trainable if "lora_" in n}) == ["lora_A", "lora_B"]
    assert all(".lora_" in n or ".modules_to_save." in n for n in probe.trainable)
    assert isinstance(probe.optimizer, torch.optim.SGD) and isinstance(probe.scheduler, torch.optim.lr_scheduler.StepLR)
    assert probe.lrs == {0.5}
    assert {g["name"]: g["weight_decay"] for g in probe.optimizer.param_groups}["no_decay"] == 0.0
    lora_a = [p for n, p in cli.model.named_parameters() if n.endswith("lora_A")]
    assert not lora_a or lora_a[0].shape[0] == 2  # merged at fit end; r came from --lora.r
    assert cli.config_init["lora"].config.r == 2 and isinstance(cli.config_init["lora"], LoRACallback)


def test_export_peft_and_merged_give_the_trained_model(trained, tiny_dir, tmp_path, capsys):
    ckpt = trained / "ckpt" / "last.ckpt"
    assert main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "peft")]) == 0
    assert main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--format", "merged"]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    reference = load_adapter_checkpoint(SequenceClassificationModule(tiny_dir, task_name="sst2"), ckpt).eval()
    tokenizer = shared.tiny_bert_tokenizer()
    batch = tokenizer(["a fine film .", "dull and slow"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not lora_layers(merged) and (tmp_path / "merged" / "tokenizer_config.json").is_file()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_dir), tmp_path / "peft")
    with torch.no_grad():
        expected = reference.model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(peft_model.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--output_dir", str(tmp_path / "x")]) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_inspect_prints_adapted_modules_and_trainable_share(tmp_path, tiny_dir, capsys):
    args = ["--config", config(tmp_path, tiny_dir), "--lora.r", "8", "--lora.modules_to_save", "[classifier, pooler]"]
    assert main(["inspect", *args]) == 0
    out = capsys.readouterr().out
    # By hand: 4 adapters (2 layers x query, value) of r x (32 + 32); the head 32 x 2 + 2; the pooler 32 x 32 + 32.
    trainable = 4 * 8 * (32 + 32) + (32 * 2 + 2) + (32 * 32 + 32)
    assert "LoRA adapts 4 modules (4 Linear)" in out
    assert f"trainable params: {trainable:,} of" in out
    assert "model.bert.encoder.layer.1.attention.self.value (Linear)" in out
    summary = inspect_config(args)
    assert summary.trainable_params == trainable and summary.adapter_params == 4 * 8 * 64
    assert summary.total_params == sum(p.numel() for p in shared.tiny_bert().parameters()) + trainable


def config_args(path: Path) -> list[str]:
    """``--config`` arguments for a shipped config; an overlay (no ``model.class_path``) goes on top of the
    first complete config in its folder, as it is meant to be used."""
    def complete(p: Path) -> bool:
        return "class_path" in ((yaml.safe_load(p.read_text()) or {}).get("model") or {})

    if complete(path):
        return ["--config", str(path)]
    base = next(p for p in sorted(path.parent.glob("*.yaml")) if complete(p))
    return ["--config", str(base), "--config", str(path)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path, capsys):
    assert main(["fit", *config_args(path), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_lora.models.")
    assert printed["lora"]["r"] >= 1


@pytest.mark.parametrize("task", ["mnli", "stsb"])
def test_glue_configs_run_a_step_on_tiny_stand_ins(task, tmp_path, tiny_dir, capsys):
    folder = {"mnli": "MNLI", "stsb": "STS-B"}[task]
    stand_ins = ["--model.init_args.model_name_or_path", tiny_dir, "--data.init_args.model_name_or_path", tiny_dir,
                 "--data.init_args.data_dir", str(SST2.parent / folder), "--data.init_args.max_length", "32",
                 "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(["fit", "--config", str(ROOT / "configs" / "glue" / f"{task}.yaml"), *stand_ins]) == 0
    out = capsys.readouterr().out
    expected = ["val_matched/accuracy=", "val_mismatched/accuracy="] if task == "mnli" else ["val/pearson=", "val/spearman="]
    assert all(name in out for name in expected)
    assert list((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("last.ckpt"))


def test_quickstart_config_runs_on_tiny_stand_ins(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quickstart writes quickstart_output/ in the working folder
    stand_ins = ["--model.init_args.model_name_or_path", tiny_dir, "--data.init_args.model_name_or_path", tiny_dir,
                 "--data.init_args.data_dir", str(SST2), "--data.init_args.max_length", "32",
                 "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]  # fmt: skip
    assert main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *stand_ins]) == 0
    assert "Validation after fit: val/accuracy=" in capsys.readouterr().out
    out = tmp_path / "quickstart_output"
    state = adapter_state(out / "checkpoints" / "last.ckpt")
    assert all(".lora_" in k or ".modules_to_save." in k for k in state)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(merged.classifier.weight, state["model.classifier.modules_to_save.weight"])


def test_bad_input_gives_a_clear_error_and_a_nonzero_exit_code(tmp_path, tiny_dir, capsys):
    cfg = config(tmp_path, tiny_dir, max_steps=1)
    assert main(["fit", "--config", cfg, "--data.init_args.task_name", "sst3"]) == 1
    assert "Unknown GLUE task 'sst3'; valid tasks: cola, sst2" in capsys.readouterr().err
    assert main(["fit", "--config", cfg, "--lora.rank", "4"]) == 2  # a key that does not exist: jsonargparse's message
    assert "rank" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", "--config", cfg, "--data.init_args.data_dir", str(empty)]) == 1
    assert "train.tsv, dev.tsv not found in" in capsys.readouterr().err
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ["fit", "validate", "test", "predict", *EXTRA_COMMANDS])


def test_short_optimizer_names_mean_torch_even_when_bitsandbytes_is_imported(tmp_path, tiny_dir):
    pytest.importorskip("bitsandbytes")  # defines its own AdamW and SGD subclasses of torch's Optimizer
    cli = LoRACLI(
        args=["--config", config(tmp_path, tiny_dir, max_steps=1), "--optimizer", "AdamW", "--optimizer.lr", "0.01",
              "--lr_scheduler=StepLR", "--lr_scheduler.step_size", "1"],
        run=False,
    )  # fmt: skip
    assert cli.config["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert cli.config["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
