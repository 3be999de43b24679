"""Acceptance on Lightning's own demo modules, each with one added ``LoRACallback(...)``.

The modules keep their own ``configure_optimizers`` (SGD over *all* parameters: frozen ones
get no gradient, so SGD skips them); only data hooks are replaced by local random tokens
where the demo would download WikiText-2.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.lstm import LightningLSTM
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRACallback, adapter_state_dict, lora_layers, merge_lora, unload_lora
from lora_test_modules import fit_kwargs

VOCAB, SEQ = 32, 6


def local_tokens(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch_size)


class LocalTransformer(LightningTransformer):
    """The demo Transformer (default sizes, dropout 0.2) with local tokens instead of WikiText-2."""

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return local_tokens()


class LocalLSTM(LightningLSTM):
    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return local_tokens()


def make(kind: str) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    return BoringModel() if kind == "boring" else LocalTransformer(vocab_size=VOCAB)


CALLBACKS = {
    "boring": dict(r=2, alpha=2, target_modules=["layer"]),
    "transformer": dict(r=2, alpha=2, target_modules="all-linear"),
}
# mid-epoch checkpoints: BoringModel has 64 batches an epoch, the Transformer here 4
STEPS = {"boring": (3, 5), "transformer": (2, 5)}


def fit(tmp_path: Path, kind: str, ckpt_path=None, checkpoint=None) -> pl.LightningModule:
    model = make(kind)
    callbacks = [LoRACallback(**CALLBACKS[kind], merge_on_fit_end=False)] + ([checkpoint] if checkpoint else [])
    trainer = pl.Trainer(
        callbacks=callbacks,
        **fit_kwargs(tmp_path, max_steps=STEPS[kind][1], enable_checkpointing=checkpoint is not None),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def inputs(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "boring":
        return (torch.randn(4, 32, generator=g),)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return tokens, tokens


@pytest.mark.parametrize("kind", ["boring", "transformer"])
def test_demo_trains_adapter_only_and_resumes_exactly(tmp_path: Path, kind: str) -> None:
    save_at, _ = STEPS[kind]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_at, save_top_k=-1)
    trained = fit(tmp_path / "a", kind, checkpoint=checkpoint)
    expected = {k: v.clone() for k, v in adapter_state_dict(trained).items()}  # saving checkpoints draws no RNG
    original = make(kind).state_dict()

    # trains, and only the adapters: the base is what it was
    assert lora_layers(trained)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trained.named_parameters())
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(trained).values() if hasattr(layer, "lora_B"))
    base = unload_lora(copy.deepcopy(trained)).state_dict()
    assert base.keys() == original.keys() and all(torch.equal(base[k], original[k]) for k in base)

    # adapter-only checkpoints
    ckpt = tmp_path / "ckpt" / f"epoch=0-step={save_at}.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all("lora_" in k for k in saved)

    # merged outputs equal unmerged ones
    trained.eval()
    with torch.no_grad():
        unmerged = trained(*inputs(kind))
        merge_lora(trained)
        assert torch.allclose(trained(*inputs(kind)), unmerged, atol=1e-5, rtol=0)

    # a fresh module resumed from the mid-epoch checkpoint ends bit-identical (dropout 0.2 included)
    got = adapter_state_dict(fit(tmp_path / "b", kind, ckpt_path=ckpt))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_demo_transformer_picks(tmp_path: Path) -> None:
    summary = LoRACallback(**CALLBACKS["transformer"]).dry_run(make("transformer"), sample_batch=inputs("transformer"))
    assert "model.decoder" not in summary.adapted  # the output head
    assert len(summary.attention) == 6  # 2 encoder self-attn, 2 decoder self-attn, 2 cross-attn
    assert sum(t == "Linear" for t in summary.adapted.values()) == 8  # linear1/linear2 of 4 layers
    assert summary.dead_adapters == {}


def test_demo_lstm_decoder_and_embedding_train_lstm_is_refused(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = LocalLSTM(vocab_size=VOCAB)
    callback = LoRACallback(r=2, target_modules=["decoder", "encoder"], merge_on_fit_end=False)
    pl.Trainer(callbacks=[callback], **fit_kwargs(tmp_path, max_steps=2, enable_checkpointing=False)).fit(model)
    assert model.model.encoder.lora_embedding_A.abs().sum() > 0  # starts at zero for embeddings
    assert model.model.decoder.lora_B.weight.abs().sum() > 0  # starts at zero for Linear
    assert not model.model.rnn.weight_ih_l0.requires_grad

    with pytest.raises(TypeError, match=r"`model.rnn` .* is a LSTM, which LoRA cannot adapt. Supported types: .*nn.Linear"):
        LoRACallback(target_modules=["rnn"]).dry_run(LocalLSTM(vocab_size=VOCAB))
