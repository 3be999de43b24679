"""GLUE dev quality: LoRA vs full fine-tuning of all-MiniLM-L6-v2 under the same epoch budget.

Each (task, variant) is one ``fit`` of ``lightning_lora.models.SequenceClassificationModule`` on
``lightning_lora.data.GLUEDataModule`` from the configs in ``configs/benchmarks/glue/``:

* ``lora``: ``lightning-lora fit --config configs/benchmarks/glue/<task>.yaml --config
  configs/benchmarks/glue/lora.yaml`` (r=8 on query/value, the classification head trained in
  full: the LoRA paper's GLUE setting);
* ``lora-all``: the same with ``lora-all.yaml`` (r=8 on every linear layer of the encoder): the
  recipe to pick when q/v falls behind full fine-tuning on a short budget;
* ``full``: the same task file with ``full.yaml`` through Lightning's own ``LightningCLI``,
  since every weight trains and no LoRA is involved.

All run in this process (the same code path as the command line). Reported: the dev metrics
after the last epoch (SST-2 accuracy, MRPC F1/accuracy, STS-B Pearson/Spearman), trainable
parameters and training wall time. Target: LoRA within 1 point of full fine-tuning.

Results accumulate per task: a run of ``--tasks mrpc`` replaces the MRPC rows of
``results/glue_quality.json`` and keeps the other tasks' rows, each with the command that
produced it (``--fresh`` drops them).

Run (about 35 min on 2 idle cores; data from the GLUE release layout)::

    python benchmarks/glue_quality.py --glue-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_lora.cli import LoRACLI

CONFIG_DIR = Path(__file__).parents[1] / "configs" / "benchmarks" / "glue"
TASKS = {"sst2": ("SST-2", ("accuracy",)), "mrpc": ("MRPC", ("f1", "accuracy")), "stsb": ("STS-B", ("pearson", "spearman"))}
VARIANTS = ("full", "lora", "lora-all")
"""``full`` first: every LoRA variant is compared with it."""
TARGET_POINTS = 1.0
QUICK_OVERRIDES = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                   "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "8"]  # fmt: skip
"""``--quick``: 1 training step and 1 dev batch per run."""


class _Recorder(pl.Callback):
    """Trainable parameters when training starts, its wall time, and the dev metrics of every validation."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.trainable = self.total = 0
        self.train_s = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in pl_module.parameters())
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_s = time.perf_counter() - self._start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})


def recipe(variant: str) -> str:
    """What ``configs/benchmarks/glue/<variant>.yaml`` sets, in one line (read from the file, not restated)."""
    config = yaml.safe_load((CONFIG_DIR / f"{variant}.yaml").read_text())
    parts = [f"lr {config['model']['init_args']['learning_rate']:g}"]
    lora = config.get("lora")
    if lora:
        targets = lora["target_modules"]
        targets = targets if isinstance(targets, str) else "/".join(targets)
        saved = "+".join(lora.get("modules_to_save") or [])
        parts.insert(0, f"r={lora['r']}, alpha={lora['alpha']} on {targets}" + (f" + {saved} (full)" if saved else ""))
    return ", ".join(parts)


def fit(task: str, variant: str, glue_dir: str, root: str, extra: list[str]) -> dict[str, Any]:
    """One ``fit`` of ``task`` with ``variant``; returns its final dev metrics, size and time."""
    folder, _ = TASKS[task]
    args = [
        "fit", "--config", str(CONFIG_DIR / f"{task}.yaml"), "--config", str(CONFIG_DIR / f"{variant}.yaml"),
        "--data.init_args.data_dir", str(Path(glue_dir) / folder), "--trainer.default_root_dir", root, *extra,
    ]  # fmt: skip
    recorder = _Recorder()
    defaults = {"callbacks": [recorder]}
    if variant.startswith("lora"):
        cli: LightningCLI = LoRACLI(args=args, trainer_defaults=defaults)
    else:
        cli = LightningCLI(
            pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=args, trainer_defaults=defaults, save_config_kwargs={"overwrite": True},
        )  # fmt: skip
    if not recorder.history:
        raise RuntimeError(f"{task}/{variant}: no validation ran; check the config's trainer settings.")
    return {
        "task": task,
        "variant": variant,
        "recipe": recipe(variant),
        "final": recorder.history[-1],
        "history": recorder.history,
        "trainable_params": recorder.trainable,
        "total_params": recorder.total,
        "train_s": recorder.train_s,
        "steps": cli.trainer.global_step,
        "epochs": cli.trainer.current_epoch,
        "args": args[1:],
    }


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, LoRA variant and metric: full FT, LoRA and the difference in points (×100)."""
    out = []
    for task, (_, metrics) in TASKS.items():
        runs = {r["variant"]: r for r in rows if r["task"] == task}
        if "full" not in runs:
            continue
        for variant in VARIANTS[1:]:
            if variant not in runs:
                continue
            for metric in metrics:
                full, lora = runs["full"]["final"][metric], runs[variant]["final"][metric]
                diff = 100 * (lora - full)
                out.append({"task": task, "variant": variant, "metric": metric, "full": full, "lora": lora,
                            "lora_minus_full_points": diff, "within_target": diff >= -TARGET_POINTS})  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]], comparison: list[dict[str, Any]]) -> str:
    runs = {(r["task"], r["variant"]): r for r in rows}
    table = []
    for c in comparison:
        full, lora = runs[(c["task"], "full")], runs[(c["task"], c["variant"])]
        mark = "✓" if c["within_target"] else f"✗ (target ≥ −{TARGET_POINTS:g})"
        table.append([
            c["task"], c["metric"], lora["recipe"], f"{100 * c['full']:.2f}", f"{100 * c['lora']:.2f}",
            f"{c['lora_minus_full_points']:+.2f} {mark}",
            f"{full['trainable_params'] / full['total_params']:.1%} / {lora['trainable_params'] / lora['total_params']:.2%}",
            f"{full['train_s']:.0f} / {lora['train_s']:.0f}", f"{lora['epochs']} ({lora['steps']} steps)",
        ])  # fmt: skip
    full_recipes = sorted({r["recipe"] for r in rows if r["variant"] == "full"})
    commands = dict.fromkeys(r.get("command", "") for r in rows)
    produced = "\n".join(f"- `{c}`: {', '.join(sorted({r['task'] for r in rows if r.get('command') == c}))}" for c in commands)
    return (
        "all-MiniLM-L6-v2, dev sets, metrics after the last epoch (×100), seed 0. Full fine-tuning: "
        f"{'; '.join(full_recipes)}; all variants AdamW with linear warm-up (6%) and decay, batch 32, "
        "the same steps.\n\n"
        + harness.md_table(
            ["task", "metric", "LoRA recipe", "full FT", "LoRA", "LoRA − full (points)", "trainable full / LoRA",
             "train s full / LoRA", "epochs (steps)"],
            table,
        )  # fmt: skip
        + f"\n\nRows by command:\n\n{produced}\n"
    )


def headline(rows: list[dict[str, Any]], comparison: list[dict[str, Any]], command: str) -> str:
    """The table README.md shows: per task and metric, full fine-tuning next to each LoRA variant."""
    by_variant = {(c["task"], c["metric"], c["variant"]): c for c in comparison}
    trainable = {(r["task"], r["variant"]): r["trainable_params"] / r["total_params"] for r in rows}
    table = []
    for task, (_, metrics) in TASKS.items():
        for metric in metrics:
            cells = [by_variant.get((task, metric, v)) for v in VARIANTS[1:]]
            if not any(cells):
                continue
            full = next(c["full"] for c in cells if c)
            table.append([task, metric, f"{100 * full:.1f}"] + [
                "—" if c is None else f"{100 * c['lora']:.1f} ({c['lora_minus_full_points']:+.1f}, "
                f"{trainable[(task, v)]:.2%} trained)"
                for v, c in zip(VARIANTS[1:], cells)
            ])  # fmt: skip
    return f"`{command}` (recipes and every figure in benchmarks/README.md):\n\n" + harness.md_table(
        ["task", "dev metric", "full FT", "LoRA r=8 q/v + head", "LoRA r=8 all-linear + head"], table
    )


def _kept_rows(json_path: Path, tasks: list[str]) -> list[dict[str, Any]]:
    """Rows of an earlier run for the tasks not run now (each keeps the command that produced it)."""
    if not json_path.is_file():
        return []
    earlier = json.loads(json_path.read_text())
    return [r for r in earlier.get("runs", []) if r["task"] not in tasks]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 training step and 1 dev batch per run: a smoke test")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]),
                        help="LoRA variants next to full fine-tuning")  # fmt: skip
    parser.add_argument("--glue-dir", default="../shared/data/glue", help="folder with SST-2/, MRPC/, STS-B/")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--out-dir", help="default: benchmarks/results (a temporary directory with --quick)")
    parser.add_argument("--fresh", action="store_true", help="drop the other tasks' rows of an earlier run")
    parser.add_argument("extra", nargs="*", help="more CLI overrides for every run, after `--`")
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    extra = list(args.extra)
    if args.quick:
        extra += QUICK_OVERRIDES
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="glue_quality_") if args.quick else harness.RESULTS_DIR))
    command = harness.command_line(__file__, argv)
    results: dict[str, Any] = {"command": command, "settings": {"threads": threads, "extra": extra}, "loadavg_start": harness.loadavg()}
    rows = [] if args.fresh else _kept_rows(out_dir / "glue_quality.json", args.tasks)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks:
            for variant in ["full", *args.variants]:
                row = fit(task, variant, args.glue_dir, str(Path(root) / f"{task}-{variant}"), extra)
                row["command"] = command
                rows.append(row)
                print(
                    f"[{time.perf_counter() - started:5.0f} s] {task} {variant}: {row['final']} "
                    f"({row['train_s']:.0f} s, {row['trainable_params']:,} trainable)",
                    flush=True,
                )
    rows.sort(key=lambda r: (list(TASKS).index(r["task"]), VARIANTS.index(r["variant"])))
    results["runs"] = rows
    results["comparison"] = compare(rows)
    results["loadavg_end"] = harness.loadavg()
    results["wall_s"] = time.perf_counter() - started
    text = markdown(rows, results["comparison"])
    json_path, md_path = harness.write_results(out_dir, "glue_quality", results, text)
    harness.update_headline(out_dir, "glue_quality_headline", headline(rows, results["comparison"], command))
    print(text)
    print(f"\nwrote {json_path} and {md_path} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
