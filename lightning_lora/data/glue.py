"""``GLUEDataModule``: the nine GLUE tasks, from the original TSV release or from Hugging Face ``datasets``.

Splits and what each Lightning stage uses:

* ``fit``: ``train.tsv``, validated on the dev set(s);
* ``validate`` and ``test``: the dev set(s), which carry labels (GLUE's test labels are private),
  logged under ``val...`` and ``test...`` respectively;
* ``predict``: the unlabeled test set(s); the predictions are written as GLUE submission files
  (``<predictions_dir>/<Task>.tsv`` with ``index`` and ``prediction``), by
  :meth:`GLUEDataModule.write_predictions`, which :class:`~lightning_lora.models.SequenceClassificationModule`
  calls at the end of ``predict``.

MNLI has two dev sets and two test sets (matched and mismatched genres): two dataloaders each.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_lora.sources import resolve_model_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GLUETask:
    """How one GLUE task is laid out and scored.

    Attributes:
        name: Task name (``sst2``).
        folder: Folder name in the GLUE release (``SST-2``), also the submission file's name.
        text_columns: Header names of the one or two text columns in ``train``/``dev`` files.
        label_column: Header name of the label column.
        labels: Label values as written in the files, in class-id order; empty for regression (STS-B).
        metrics: Metric names logged for the task (see ``SequenceClassificationModule``).
        eval_files: ``(suffix, file)`` of the labeled dev sets; the suffix extends the log prefix
            (``val`` + ``_matched``).
        test_files: ``(submission name, file)`` of the unlabeled test sets.
        index_column: Header name of the example id in test files.
        headerless_columns: Column names of ``train``/``dev`` files that have no header row (CoLA).
        hf_text_columns: The text columns in the Hugging Face ``glue`` dataset.
        hf_eval_splits, hf_test_splits: Its split names for ``eval_files`` and ``test_files``.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    eval_files: tuple[tuple[str, str], ...] = (("", "dev.tsv"),)
    test_files: tuple[tuple[str, str], ...] = ()
    index_column: str = "index"
    headerless_columns: Optional[tuple[str, ...]] = None
    hf_text_columns: tuple[str, ...] = ("sentence1", "sentence2")
    hf_eval_splits: tuple[str, ...] = ("validation",)
    hf_test_splits: tuple[str, ...] = ("test",)

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier: number of classes, 1 for regression."""
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels

    def test_submission_files(self) -> tuple[tuple[str, str], ...]:
        return self.test_files or ((self.folder, "test.tsv"),)


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

#: The nine GLUE tasks by name.
GLUE_TASKS: dict[str, GLUETask] = {
    task.name: task
    for task in (
        GLUETask(
            "cola", "CoLA", ("sentence",), "label", _BINARY, ("matthews_corrcoef", "accuracy"),
            headerless_columns=("source", "label", "mark", "sentence"), hf_text_columns=("sentence",),
        ),
        GLUETask("sst2", "SST-2", ("sentence",), "label", _BINARY, ("accuracy",), hf_text_columns=("sentence",)),
        GLUETask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, ("accuracy", "f1")),
        GLUETask("stsb", "STS-B", ("sentence1", "sentence2"), "score", (), ("pearson", "spearman")),
        GLUETask(
            "qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, ("accuracy", "f1"),
            index_column="id", hf_text_columns=("question1", "question2"),
        ),
        GLUETask(
            "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            eval_files=(("_matched", "dev_matched.tsv"), ("_mismatched", "dev_mismatched.tsv")),
            test_files=(("MNLI-m", "test_matched.tsv"), ("MNLI-mm", "test_mismatched.tsv")),
            hf_text_columns=("premise", "hypothesis"),
            hf_eval_splits=("validation_matched", "validation_mismatched"),
            hf_test_splits=("test_matched", "test_mismatched"),
        ),
        GLUETask(
            "qnli", "QNLI", ("question", "sentence"), "label", _ENTAILMENT, ("accuracy",),
            hf_text_columns=("question", "sentence"),
        ),
        GLUETask("rte", "RTE", ("sentence1", "sentence2"), "label", _ENTAILMENT, ("accuracy",)),
        GLUETask("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, ("accuracy",)),
    )
}  # fmt: skip

#: STS-B similarity scores lie in this range.
STSB_RANGE = (0.0, 5.0)


def glue_task(task_name: str) -> GLUETask:
    """The :class:`GLUETask` for a name such as ``sst2``, ``SST-2`` or ``sts-b`` (case and dashes ignored)."""
    key = task_name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task_name!r}; valid tasks: {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


@dataclass
class GLUEExample:
    """One example: its text(s), its label (class id, score, or None in test sets) and its id."""

    texts: tuple[str, ...]
    label: Optional[float | int]
    index: str


def read_glue_tsv(path: Path, task: GLUETask, labeled: bool) -> list[GLUEExample]:
    """Examples of one GLUE TSV file in the original release's format (quoting off, BOM stripped).

    Raises ``ValueError`` naming the file, line and column for missing columns, unknown labels
    and empty files.
    """
    with open(path, encoding="utf-8-sig", newline="") as file:
        rows = [(n + 1, row) for n, row in enumerate(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)) if row]
    headerless = labeled and task.headerless_columns is not None
    if headerless:
        header = list(task.headerless_columns or ())
    elif rows:
        header = [name.strip() for name in rows.pop(0)[1]]
    else:
        raise ValueError(f"{path} is empty; expected a header line and data rows.")
    wanted = list(task.text_columns)  # test files name their text columns as train/dev do
    wanted += [task.label_column] if labeled else [task.index_column]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ValueError(
            f"{path}, line 1: missing column {missing[0]!r} for task {task.name} (the header has {header}; "
            f"expected columns {wanted})."
        )
    positions = [header.index(name) for name in wanted]
    examples = []
    for line, row in rows:
        if len(row) <= max(positions):
            column = next(name for name, pos in zip(wanted, positions) if pos >= len(row))
            raise ValueError(
                f"{path}, line {line}: missing column {column!r} (the row has {len(row)} tab-separated fields, "
                f"the header {len(header)})."
            )
        values = [row[pos] for pos in positions]
        texts = tuple(values[: len(task.text_columns)])
        if labeled:
            examples.append(GLUEExample(texts, _parse_label(values[-1], task, path, line), str(len(examples))))
        else:
            examples.append(GLUEExample(texts, None, values[-1]))
    if not examples:
        raise ValueError(f"{path} has no data rows (task {task.name}); the split must not be empty.")
    return examples


def _parse_label(value: str, task: GLUETask, path: Path, line: int) -> float | int:
    if task.is_regression:
        low, high = STSB_RANGE
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not low <= score <= high:
            raise ValueError(f"{path}, line {line}: score {value!r} is not a number from {low} to {high}.")
        return score
    if value not in task.labels:
        raise ValueError(
            f"{path}, line {line}: label {value!r} is out of range for task {task.name}; "
            f"valid labels: {', '.join(task.labels)}."
        )
    return task.labels.index(value)


class _Encoded(torch.utils.data.Dataset):
    """Tokenized examples as dicts: the tokenizer's fields, ``labels`` (when labeled) and ``idx`` (position)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


class LengthGroupedSampler(Sampler[int]):
    """A random order of the training rows in which each batch holds rows of similar length.

    With dynamic padding a batch costs its longest row times its size; GLUE lengths vary a lot
    (SST-2: 2 to 60 tokens), so random batches are about half padding. As in the Hugging Face
    Trainer's ``group_by_length``: shuffle, sort each run of ``50 * batch_size`` rows by length,
    cut it into batches, shuffle the batches (the one short batch, if any, comes last). The
    randomness comes from torch's global RNG, like a ``RandomSampler`` without a generator.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, batches_per_group: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = batch_size * batches_per_group

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):  # noqa: ANN204 -- Iterator[int]
        order = torch.randperm(len(self.lengths)).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            run = sorted(order[start : start + self.group], key=lambda i: -self.lengths[i])
            batches += [run[i : i + self.batch_size] for i in range(0, len(run), self.batch_size)]
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        for b in torch.randperm(len(batches)).tolist() + [len(batches)] * len(short):
            yield from (batches + short)[b]


class GLUEDataModule(pl.LightningDataModule):
    """A GLUE task tokenized for a sequence classifier, with dynamic padding (each batch to its longest row).

    Example::

        data = GLUEDataModule("sst2", data_dir="glue_data/SST-2", model_name_or_path="roberta-base")
        trainer.fit(SequenceClassificationModule("roberta-base", task_name="sst2"), data)

    Args:
        task_name: One of ``cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli`` (``SST-2`` etc. also work).
        data_dir: The task's folder in the original GLUE release layout (``train.tsv``, ``dev.tsv``,
            ``test.tsv``; MNLI ``dev_matched.tsv``, ``dev_mismatched.tsv``, ``test_matched.tsv``,
            ``test_mismatched.tsv``). ``None``: download the task with Hugging Face ``datasets`` (needs
            the network, or a filled ``datasets`` cache).
        model_name_or_path: The tokenizer's source: a hub name, a folder, or ``pkg:<module>``
            (see :mod:`lightning_lora.sources`). Normally the model's own.
        max_length: Longer inputs are truncated to this many tokens.
        batch_size: Training batch size.
        eval_batch_size: Batch size for dev/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        predictions_dir: Where ``predict`` writes the GLUE submission files.
        group_by_length: Batch training rows of similar length (:class:`LengthGroupedSampler`), which
            about halves the padding; ``False``: plain shuffling. Evaluation batches are always
            formed from rows sorted by length (the metrics do not depend on the order).
    """

    def __init__(
        self,
        task_name: str,
        data_dir: Optional[str] = None,
        model_name_or_path: str = "roberta-base",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        predictions_dir: str = "glue_predictions",
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        self.task = glue_task(task_name)
        if data_dir is not None and not Path(data_dir).is_dir():
            raise FileNotFoundError(
                f"GLUE data_dir {data_dir!r} is not a folder; give the {self.task.folder} folder of the GLUE release "
                "(with train.tsv, dev.tsv, ...) or leave data_dir unset to download the task with `datasets`."
            )
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be positive, got {max_length} and {batch_size}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.model_name_or_path = model_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predictions_dir = Path(predictions_dir)
        self.group_by_length = group_by_length
        self._tokenizer: Any = None
        self.train_set: Optional[_Encoded] = None
        self.eval_sets: list[_Encoded] = []
        self.test_sets: list[_Encoded] = []
        self.test_indices: list[list[str]] = []

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of ``model_name_or_path`` (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(self.model_name_or_path))
        return self._tokenizer

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    # -- reading ---------------------------------------------------------------------------------
    def expected_files(self, stage: str) -> list[str]:
        """The file names ``stage`` reads from ``data_dir``."""
        evals = [name for _, name in self.task.eval_files]
        return {
            "fit": ["train.tsv", *evals],
            "validate": evals,
            "test": evals,
            "predict": [name for _, name in self.task.test_submission_files()],
        }[stage]

    def _read_split(self, split: str) -> list[list[GLUEExample]]:
        """``split`` is ``train``, ``eval`` or ``predict``: a list of example lists (one per dataloader)."""
        names = {
            "train": ["train.tsv"],
            "eval": [name for _, name in self.task.eval_files],
            "predict": [name for _, name in self.task.test_submission_files()],
        }[split]
        if self.data_dir is None:
            return self._read_hf_split(split)
        return [read_glue_tsv(self.data_dir / name, self.task, labeled=split != "predict") for name in names]

    def _read_hf_split(self, split: str) -> list[list[GLUEExample]]:
        """The same examples from the Hugging Face ``glue`` dataset (labels are already class ids there)."""
        splits = {"train": ("train",), "eval": self.task.hf_eval_splits, "predict": self.task.hf_test_splits}[split]
        try:
            from datasets import load_dataset

            parts = [load_dataset("nyu-mll/glue", self.task.name, split=name) for name in splits]
        except Exception as err:  # noqa: BLE001 -- any failure here means: no data
            raise ValueError(
                f"Could not load GLUE task {self.task.name} with Hugging Face `datasets` ({type(err).__name__}: {err}). "
                f"Offline, pass data_dir= the {self.task.folder} folder of the GLUE release."
            ) from None
        out = []
        for part in parts:
            examples = []
            for row in part:
                texts = tuple(row[c] for c in self.task.hf_text_columns)
                label = None if split == "predict" else row["label"]
                examples.append(GLUEExample(texts, label, str(row["idx"])))
            if not examples:
                raise ValueError(f"GLUE task {self.task.name}: the Hugging Face split {splits} is empty.")
            out.append(examples)
        return out

    def _encode(self, examples: Sequence[GLUEExample], labeled: bool) -> _Encoded:
        columns = list(zip(*(e.texts for e in examples)))
        encoded = self.tokenizer(*[list(c) for c in columns], truncation=True, max_length=self.max_length)
        label_type = float if self.task.is_regression else int
        features = []
        for i, example in enumerate(examples):
            feature = {key: values[i] for key, values in encoded.items()}
            feature["idx"] = i
            if labeled:
                feature["labels"] = label_type(example.label)
            features.append(feature)
        return _Encoded(features)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (once, on one process) when reading from Hugging Face ``datasets``."""
        if self.data_dir is None:
            self._read_hf_split("train")

    def setup(self, stage: str) -> None:
        """Read and tokenize what ``stage`` needs; a missing file is an error naming every expected file."""
        if self.data_dir is not None:
            expected = self.expected_files(stage)
            missing = [name for name in expected if not (self.data_dir / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"GLUE task {self.task.name} ({stage}): {', '.join(missing)} not found in {self.data_dir}; "
                    f"this stage reads {', '.join(expected)} (original GLUE release layout)."
                )
        if stage == "fit" and self.train_set is None:
            self.train_set = self._encode(self._read_split("train")[0], labeled=True)
        if stage in ("fit", "validate", "test") and not self.eval_sets:
            self.eval_sets = [self._encode(part, labeled=True) for part in self._read_split("eval")]
        if stage == "predict" and not self.test_sets:
            parts = self._read_split("predict")
            self.test_sets = [self._encode(part, labeled=False) for part in parts]
            self.test_indices = [[e.index for e in part] for part in parts]

    def _loader(self, dataset: _Encoded, batch_size: int, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate
        )

    def _eval_loader(self, dataset: _Encoded) -> DataLoader:
        by_length = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
        return self._loader(dataset, self.eval_batch_size, by_length)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad the token fields to the batch's longest row; stack ``labels`` and ``idx``."""
        extra = ("labels", "idx")
        batch = self.tokenizer.pad(
            [{k: v for k, v in f.items() if k not in extra} for f in features], return_tensors="pt"
        )
        batch = dict(batch)
        batch["idx"] = torch.tensor([f["idx"] for f in features])
        if "labels" in features[0]:
            dtype = torch.float32 if self.task.is_regression else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        if self.group_by_length:
            lengths = [len(f["input_ids"]) for f in self.train_set.features]
            sampler: Sampler[int] = LengthGroupedSampler(lengths, self.batch_size)
        else:
            sampler = torch.utils.data.RandomSampler(self.train_set)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(d) for d in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(d) for d in self.test_sets]

    # -- GLUE submission files ---------------------------------------------------------------------
    def write_predictions(self, predictions: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Path]:
        """Write one GLUE submission file per test set: ``index<TAB>prediction`` rows in file order.

        Args:
            predictions: Per predict dataloader, ``(idx, prediction)``: the positions of the rows
                (the batches' ``idx``) and the predicted class ids (or STS-B scores, clipped to 0..5).

        Returns:
            The written files, ``<predictions_dir>/<name>.tsv`` (e.g. ``SST-2.tsv``, ``MNLI-m.tsv``).
        """
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for (name, _), indices, (idx, values) in zip(self.task.test_submission_files(), self.test_indices, predictions):
            order = torch.argsort(idx)
            idx, values = idx[order], values[order]
            if idx.tolist() != list(range(len(indices))):
                raise ValueError(
                    f"predictions for {name} cover {len(idx)} rows of {len(indices)}; run predict on the whole test set."
                )
            path = self.predictions_dir / f"{name}.tsv"
            with open(path, "w", encoding="utf-8", newline="") as file:
                file.write("index\tprediction\n")
                for index, value in zip(indices, values.tolist()):
                    if self.task.is_regression:
                        file.write(f"{index}\t{min(max(value, STSB_RANGE[0]), STSB_RANGE[1]):.3f}\n")
                    else:
                        file.write(f"{index}\t{self.task.labels[int(value)]}\n")
            written.append(path)
            log.info("GLUE submission file written: %s", path)
        return written
