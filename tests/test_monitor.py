"""LoRAMonitor / LoRACallback(log_delta_every_n_steps): ‖ΔW‖_F and effective rank logged during fit."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger
from lora_test_modules import BertClassifier, fit_kwargs, token_loader

from lightning_lora import LoRACallback
from lightning_lora.analysis import analyze_model
from lightning_lora.monitor import LoRAMonitor


def test_callback_option_logs_delta_norms_and_ranks(tmp_path):
    module = BertClassifier()
    callback = LoRACallback(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                            merge_on_fit_end=False, log_delta_every_n_steps=2)  # fmt: skip
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(**fit_kwargs(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1), callbacks=[callback])
    trainer.fit(module, token_loader(n=48, batch_size=8))
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    key = "lora_delta/model.bert.encoder.layer.1.attention.self.value/fro"
    logged = {int(row["step"]): float(row[key]) for row in rows if row.get(key)}
    assert sorted(logged) == [2, 4, 6]
    assert 0 < logged[2] < logged[6]  # B starts at 0 and grows
    # the last logged value (from the r×r core) equals ‖ΔW‖_F of the final adapter, formed in full
    final = {r.name: r for r in analyze_model(module)}
    assert logged[6] == pytest.approx(final["model.bert.encoder.layer.1.attention.self.value"].delta_norm, rel=1e-6)
    ranks = [float(row[key.replace("/fro", "/eff_rank90")]) for row in rows if row.get(key)]
    assert all(1 <= k <= 4 for k in ranks)
    assert len(callback._monitor.seconds) == 3


def test_monitor_standalone_and_validation(tmp_path):
    monitor = LoRAMonitor(every_n_steps=3)
    trainer = pl.Trainer(**fit_kwargs(tmp_path, max_steps=3, logger=CSVLogger(tmp_path), log_every_n_steps=1))
    trainer.callbacks.append(LoRACallback(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    trainer.callbacks.append(monitor)
    trainer.fit(BertClassifier(), token_loader(n=24, batch_size=8))
    assert len(monitor.seconds) == 1
    with pytest.raises(ValueError, match="every_n_steps"):
        LoRAMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        LoRACallback(log_delta_every_n_steps=-1)
