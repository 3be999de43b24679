"""Ordinary LightningModules and data shared by the callback tests: tiny, built from configs, offline."""

from __future__ import annotations

import re
import string
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 100
SEQ = 8


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def token_data(n: int = 48, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # learnable: label depends on the first token
    return TensorDataset(ids, labels)


def token_loader(n: int = 48, batch_size: int = 8, shuffle: bool = False, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(1234) if shuffle else None
    return DataLoader(token_data(n, seed), batch_size=batch_size, shuffle=shuffle, generator=generator)


class BertClassifier(pl.LightningModule):
    """The kind of module a user already has: a transformers model, a loss, AdamW over self.parameters()."""

    def __init__(self, seed: int = 0, lr: float = 1e-2, **config_overrides) -> None:
        super().__init__()
        self.model = tiny_bert(seed, **config_overrides)
        self.lr = lr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = nn.functional.cross_entropy(self(ids).float(), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, labels = batch
        loss = nn.functional.cross_entropy(self(ids).float(), labels)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class LazyBertClassifier(BertClassifier):
    """Builds its model in `configure_model`, as Lightning recommends for large models."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        pl.LightningModule.__init__(self)
        self.seed, self.lr, self.model = seed, lr, None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert(self.seed)


class EarlyOptimizerClassifier(BertClassifier):
    """A common mistake: parameters collected in __init__, before LoRA exists."""

    def __init__(self) -> None:
        super().__init__()
        self.params_at_init = list(self.parameters())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.params_at_init, lr=self.lr)


class NoParams(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


def fit_kwargs(tmp_path, **overrides) -> dict:
    values = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    values.update(overrides)
    return values


CHARS = string.ascii_letters + string.digits + " \n.,:;!?#'\"()-_=+*/<>[]{}"
#: A chat template for :func:`tiny_tokenizer` (the ids of `<s>`/`</s>` are Llama's BOS/EOS, 1 and 2).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer(chat_template: bool = False):
    """A character-level tokenizer built locally: 90 ids (fits VOCAB), BOS `<s>`=1 prepended, EOS `</s>`=2, no pad."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm_dir(path, arch: str = "llama", chat_template: bool = False, seed: int = 0) -> str:
    """A folder with a tiny from-config causal LM (`llama` or `gpt2`) and :func:`tiny_tokenizer`, for `from_pretrained`."""
    model = tiny_llama(seed=seed) if arch == "llama" else tiny_gpt2(seed)
    model.save_pretrained(str(path))
    tiny_tokenizer(chat_template).save_pretrained(str(path))
    return str(path)


def alpaca_records(n: int = 32, seed: int = 0) -> list[dict]:
    """Short Alpaca records (reverse a random word), every fourth with an `input`; memorisable by a tiny model."""
    import random

    rng = random.Random(seed)
    records = []
    for i in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        output = f"The answer is {word[::-1]}."
        records.append({"instruction": f"Reverse {word}.", "input": "caps" if i % 4 == 3 else "", "output": output})
    return records


def readme_block(section: str) -> str:
    """The first ```python block of README.md's section ``## <section>``."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.DOTALL).group(1)


def tiny_bert_tokenizer():
    """A BERT WordPiece tokenizer over single characters (74 ids, fits VOCAB), built locally."""
    from transformers import BertTokenizerFast

    letters = string.ascii_lowercase
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *string.digits, *(f"##{c}" for c in letters)]
    vocab += list(".,'\"-!?")
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def tiny_bert_classifier_dir(path, num_labels: int = 2, seed: int = 0, **overrides) -> str:
    """A folder with a tiny from-config BERT classifier and :func:`tiny_bert_tokenizer`, for `from_pretrained`.

    BERT's initialization (std 0.02) gives nearly the same pooled output for every input; a larger
    ``initializer_range`` (e.g. 0.5) makes the outputs of a random model differ from row to row."""
    tiny_bert(seed, num_labels=num_labels, **overrides).save_pretrained(str(path))
    tiny_bert_tokenizer().save_pretrained(str(path))
    return str(path)
