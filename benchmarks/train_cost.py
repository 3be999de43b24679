"""Training cost of lightning-lora next to PEFT, full fine-tuning and the frozen "bound".

Every variant trains the same model on the same fixed batch through the same Lightning
loop (one ``LightningModule``, ``Trainer(max_steps=...)``, AdamW):

* ``full``: every weight trains;
* ``ours-qv`` / ``ours-all``: ``LoRACallback(r=8, alpha=16)`` on q/v (GPT-2: the fused
  ``c_attn``) or ``"all-linear"``, the classification head trained in full;
* ``peft-qv`` / ``peft-all``: ``peft.get_peft_model`` with the identical ``LoraConfig``;
* ``bound``: frozen base, no adapters, but ``inputs_embeds.requires_grad_()`` so the
  backward still computes activation gradients through every layer and no weight
  gradient. No adapter method can be cheaper than this.

Each (variant, repetition) runs in a fresh process, so its peak RSS is its own; the
variants are interleaved (the order rotates every repetition) so machine noise hits all
alike. Reported: median step time over the measured steps of all repetitions (warm-up
steps dropped) in wall-clock and in CPU seconds (all threads; on a shared machine the CPU
time moves less with other users' load than the wall time), peak RSS, trainable parameters, optimizer-state bytes, checkpoint bytes
(``trainer.save_checkpoint``; ours is adapter-only) and PEFT-format adapter directories,
and the time of ``import lightning_lora`` vs ``import peft`` in fresh interpreters.

Run (about 40 min on 2 idle cores)::

    python benchmarks/train_cost.py

``--quick`` runs tiny models for a few steps (a smoke test, seconds with ``--in-process``).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import harness
import lightning.pytorch as pl
import torch

VARIANTS = {
    "full": "full fine-tuning",
    "bound": "bound: frozen, no adapters, grads through all layers",
    "ours-qv": "lightning-lora, q/v",
    "peft-qv": "PEFT, q/v",
    "ours-all": "lightning-lora, all-linear",
    "peft-all": "PEFT, all-linear",
}
_FAST_VARIANTS = ["full", "bound", "ours-qv", "peft-qv"]
DEFAULT_VARIANTS = {"minilm": list(VARIANTS), "bert-base": _FAST_VARIANTS, "gpt2-small": _FAST_VARIANTS}
"""all-linear variants only on MiniLM by default: on the 110M+ models each variant costs ~5 min."""

R, ALPHA, LR = 8, 16, 1e-5


# -- one variant, one repetition (runs in its own process) ---------------------------------------
def run_variant(model: str, variant: str, batch: int, seq: int, warmup: int, steps: int, save_dir: str | None) -> dict:
    """Train ``model`` with ``variant`` for ``warmup + steps`` steps and measure it.

    With ``save_dir``, also writes the checkpoint (and adapter directory) there when
    training ends and records their sizes.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    spec = harness.model_spec(model)
    ours, peft_variant = variant.startswith("ours-"), variant.startswith("peft-")
    if ours:
        import lightning_lora
    if peft_variant:
        import peft
    rss_imports = harness.current_rss_mb()
    net = spec.build()
    targets: Any = list(spec.qv_targets) if variant.endswith("-qv") else "all-linear"
    callbacks: list[pl.Callback] = []
    if ours:
        callbacks.append(
            lightning_lora.LoRACallback(r=R, alpha=ALPHA, target_modules=targets, modules_to_save=spec.modules_to_save)
        )
    if peft_variant:
        config = peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, task_type=spec.peft_task_type
        )
        net = peft.get_peft_model(net, config)

    class CostModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net
            if variant == "bound":
                self.model.requires_grad_(False)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            ids, labels = batch
            if variant == "bound":
                embeds = self.model.get_input_embeddings()(ids).requires_grad_()
                return self.model(inputs_embeds=embeds, labels=labels).loss
            return self.model(input_ids=ids, labels=labels).loss

        def configure_optimizers(self) -> Any:
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=LR) if params else None

    timer = _StepTimer(variant, save_dir)
    module = CostModule()
    data = harness.token_batch(spec, batch, seq)
    loader = torch.utils.data.DataLoader([(data["input_ids"], data["labels"])] * (warmup + steps), batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, timer],
    )  # fmt: skip
    load_start = harness.loadavg()
    trainer.fit(module, loader)
    return {
        "model": model,
        "variant": variant,
        "warmup_times": timer.times[:warmup],
        "step_times": timer.times[warmup:],
        "step_cpu_times": timer.cpu_times[warmup:],
        "trainable_params": timer.trainable,
        "total_params": timer.total,
        "optimizer_state_bytes": timer.optimizer_state_bytes,
        "ckpt_bytes": timer.ckpt_bytes,
        "adapter_dir_bytes": timer.adapter_dir_bytes,
        "rss_after_imports_mb": rss_imports,
        "peak_rss_mb": harness.peak_rss_mb(),
        "loadavg_start": load_start,
        "loadavg_end": harness.loadavg(),
    }


class _StepTimer(pl.Callback):
    """Times every training batch (forward, backward, optimizer step) and, at the end of
    training (before LoRACallback merges in ``on_fit_end``), records sizes."""

    def __init__(self, variant: str, save_dir: str | None) -> None:
        self.variant, self.save_dir = variant, save_dir
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU seconds of all threads: less sensitive to other users than wall time
        self.trainable = self.total = self.optimizer_state_bytes = 0
        self.ckpt_bytes: int | None = None
        self.adapter_dir_bytes: int | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in pl_module.parameters())
        self.optimizer_state_bytes = sum(
            t.numel() * t.element_size()
            for opt in trainer.optimizers
            for state in opt.state.values()
            for t in state.values()
            if hasattr(t, "numel")
        )
        if self.save_dir is None:
            return
        ckpt = Path(self.save_dir) / f"{self.variant}.ckpt"
        trainer.save_checkpoint(ckpt)
        self.ckpt_bytes = harness.path_bytes(ckpt)
        adapter_dir = Path(self.save_dir) / f"{self.variant}-adapter"
        if self.variant.startswith("ours-"):
            from lightning_lora import save_adapter

            save_adapter(pl_module, adapter_dir)
        elif self.variant.startswith("peft-"):
            pl_module.model.save_pretrained(adapter_dir)
        if adapter_dir.exists():
            self.adapter_dir_bytes = harness.path_bytes(adapter_dir)


# -- the driver --------------------------------------------------------------------------------
def _run_worker(job: dict, in_process: bool) -> dict:
    if in_process:
        return run_variant(**job)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", json.dumps(job), "--worker-out", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {job['model']}/{job['variant']} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def import_times(reps: int) -> dict[str, float]:
    """Median seconds of ``python -c "import <module>"`` in fresh interpreters, interleaved."""
    modules = ["torch", "lightning_lora", "peft"]
    times: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(reps):
        for module in modules:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
            times[module].append(time.perf_counter() - start)
    return {m: harness.median(t) for m, t in times.items()}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant: median step time over all measured steps, per-repetition medians, medians of the rest."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        rep_medians = [harness.median(r["step_times"]) for r in mine]
        saved = next((r for r in mine if r["ckpt_bytes"] is not None), mine[0])
        in_own_process = all(r["peak_rss_mb"] is not None for r in mine)
        out[variant] = {
            "step_time_s": harness.median([t for r in mine for t in r["step_times"]]),
            "rep_median_step_time_s": rep_medians,
            "step_cpu_s": harness.median([t for r in mine for t in r["step_cpu_times"]]),
            "measured_steps": sum(len(r["step_times"]) for r in mine),
            "peak_rss_mb": harness.median([r["peak_rss_mb"] for r in mine]) if in_own_process else None,
            "peak_above_imports_mb": (
                harness.median([r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in mine]) if in_own_process else None
            ),
            "trainable_params": saved["trainable_params"],
            "total_params": saved["total_params"],
            "optimizer_state_bytes": saved["optimizer_state_bytes"],
            "ckpt_bytes": saved["ckpt_bytes"],
            "adapter_dir_bytes": saved["adapter_dir_bytes"],
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ratios(summary: dict[str, dict]) -> list[dict]:
    """ours/PEFT, ours/bound, ours/full for time and memory; adapter/full for checkpoint bytes."""
    rows = []
    for kind in ("qv", "all"):
        ours = summary.get(f"ours-{kind}")
        if ours is None:
            continue
        for other, target_time in ((f"peft-{kind}", 0.95), ("bound", 1.05), ("full", None)):
            if other not in summary:
                continue
            theirs = summary[other]
            row = {
                "ours": f"ours-{kind}",
                "vs": other,
                "step_time": ours["step_time_s"] / theirs["step_time_s"],
                "step_time_target": target_time,
                "step_cpu": ours["step_cpu_s"] / theirs["step_cpu_s"],
                "peak_rss": _ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]),
                "peak_rss_target": 1.0 if other.startswith("peft") else None,
                "peak_above_imports": _ratio(ours["peak_above_imports_mb"], theirs["peak_above_imports_mb"]),
                "ckpt": _ratio(ours["ckpt_bytes"], theirs["ckpt_bytes"]) if other == "full" else None,
                "ckpt_target": 0.01 if other == "full" else None,
            }
            rows.append(row)
    return rows


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}" if n < 2**30 else f"{n / 2**20:.0f}"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _check(value: float | None, target: float | None) -> str:
    if value is None:
        return "—"
    mark = "" if target is None else (" ✓" if value <= target else f" ✗ (target ≤ {target:g})")
    return f"{value:.3f}{mark}"


def markdown(results: dict) -> str:
    parts = []
    for model, block in results["models"].items():
        rows = []
        for variant, s in block["summary"].items():
            spread = f"{min(s['rep_median_step_time_s']):.3f}–{max(s['rep_median_step_time_s']):.3f}"
            rows.append([
                VARIANTS[variant], f"{s['trainable_params']:,} ({s['trainable_params'] / s['total_params']:.2%})",
                f"{s['step_time_s']:.3f}", spread, f"{s['step_cpu_s']:.3f}",
                _num(s["peak_rss_mb"], ".0f"), _num(s["peak_above_imports_mb"], ".0f"),
                _mb(s["optimizer_state_bytes"]), _mb(s["ckpt_bytes"]), _mb(s["adapter_dir_bytes"]),
            ])  # fmt: skip
        made_by = f"`{block['command']}`, load average at the end {block['loadavg_end']}\n\n" if "command" in block else ""
        parts.append(
            f"### {model}\n\n{made_by}"
            + harness.md_table(
                ["variant", "trainable params", "step s (median)", "per-rep medians", "CPU s / step", "peak RSS MiB",
                 "peak − imports MiB", "optimizer state MiB", "checkpoint MiB", "adapter dir MiB"],
                rows,
            )  # fmt: skip
        )
        ratio_rows = []
        for r in block["ratios"]:
            ratio_rows.append([
                f"{r['ours']} / {r['vs']}", _check(r["step_time"], r["step_time_target"]), f"{r['step_cpu']:.3f}",
                _check(r["peak_rss"], r["peak_rss_target"]), _num(r["peak_above_imports"], ".3f"),
                _check(r["ckpt"], r["ckpt_target"]),
            ])  # fmt: skip
        parts.append(
            f"Ratios ({model}):\n\n"
            + harness.md_table(["ratio", "step time", "CPU time", "peak RSS", "peak − imports", "checkpoint bytes"], ratio_rows)
        )
    imports = results.get("import_s")
    if imports:
        parts.append(
            "Import time (fresh interpreter, median): "
            + ", ".join(f"`import {m}` {t:.2f} s" for m, t in imports.items())
            + f"; lightning_lora/peft = {imports['lightning_lora'] / imports['peft']:.2f}."
        )
    return "\n\n".join(parts)


def headline(results: dict, timing: bool = True) -> str:
    """The table README.md shows: lightning-lora's ratios per model and target set (``timing=False``:
    without the step-time columns, for runs whose times were not interleaved)."""
    rows = []
    for model, block in results["models"].items():
        by_vs = {(r["ours"], r["vs"]): r for r in block["ratios"]}
        for kind, label in (("qv", "q/v"), ("all", "all-linear")):
            peft, bound, full = (by_vs.get((f"ours-{kind}", vs)) for vs in (f"peft-{kind}", "bound", "full"))
            if peft is None and bound is None:
                continue
            rows.append([
                model, label, _num(peft and peft["step_time"], ".2f"), _num(bound and bound["step_time"], ".2f"),
                _num(peft and peft["peak_rss"], ".2f"), _num(full and full["ckpt"], ".2%"),
            ])  # fmt: skip
    loads: dict[str, list[float]] = {}
    for block in results["models"].values():
        load = block.get("loadavg_end", results["loadavg_end"])
        loads.setdefault(block.get("command", results.get("command", "")), []).append(load[0])
    caption = (
        "; ".join(f"`{command}` (1-min load average {min(ls):g}–{max(ls):g})" for command, ls in loads.items())
        + f", {results['settings']['threads']} threads (see benchmarks/README.md for every figure):\n\n"
    )
    headers = ["model", "LoRA r=8 on", "step time vs PEFT", "step time vs bound", "peak RSS vs PEFT", "checkpoint vs full FT"]
    if not timing:
        headers, rows = headers[:2] + headers[4:], [row[:2] + row[4:] for row in rows]
    return caption + harness.md_table(headers, rows)


def _earlier_results(json_path: Path, models: list[str]) -> dict[str, Any]:
    """An earlier run's results, less the models run now: results accumulate per model, each
    block keeping the command and load average it was measured with."""
    if not json_path.is_file():
        return {}
    earlier = json.loads(json_path.read_text())
    kept = {m: block for m, block in earlier.get("models", {}).items() if m not in models}
    for block in kept.values():
        block.setdefault("command", earlier.get("command", ""))
        block.setdefault("loadavg_end", earlier.get("loadavg_end"))
    return {"models": kept, **({"import_s": earlier["import_s"]} if "import_s" in earlier else {})}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test")
    parser.add_argument("--models", nargs="+", help=f"from {', '.join(harness.MODELS)}")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: per model, see DEFAULT_VARIANTS")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, variants interleaved within each")
    parser.add_argument("--warmup", type=int, help="unmeasured steps at the start of every repetition")
    parser.add_argument("--steps", type=int, help="measured steps per repetition")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--import-reps", type=int, default=5, help="fresh interpreters per import timing (0: skip)")
    parser.add_argument("--in-process", action="store_true", help="no process per variant (peak RSS not per variant)")
    parser.add_argument("--out-dir", help="default: benchmarks/results (a temporary directory with --quick)")
    parser.add_argument("--fresh", action="store_true", help="drop the other models' results of an earlier run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_variant(**json.loads(args.worker))))
        return {}
    size = dict(batch=2, seq=16, warmup=1, steps=3) if args.quick else dict(batch=16, seq=128, warmup=2, steps=7)
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = args.models or (["tiny-bert", "tiny-gpt2"] if args.quick else list(DEFAULT_VARIANTS))
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="train_cost_") if args.quick else harness.RESULTS_DIR)
    command = harness.command_line(__file__, argv)
    earlier = {} if args.fresh else _earlier_results(Path(out_dir) / "train_cost.json", models)
    results: dict[str, Any] = {
        "command": command,
        "settings": {k: getattr(args, k) for k in ("batch", "seq", "warmup", "steps", "reps", "in_process")}
        | {"threads": threads, "r": R, "alpha": ALPHA, "lr": LR, "dtype": "float32"},
        "loadavg_start": harness.loadavg(),
        "models": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as ckpt_root:
        for model in models:
            variants = args.variants or DEFAULT_VARIANTS.get(model, list(VARIANTS))
            runs = []
            for rep in range(args.reps):
                order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
                for variant in order:
                    save_dir = None
                    if rep == 0:
                        save_dir = str(Path(ckpt_root) / model)
                        Path(save_dir).mkdir(exist_ok=True)
                    job = dict(model=model, variant=variant, batch=args.batch, seq=args.seq, warmup=args.warmup,
                               steps=args.steps, save_dir=save_dir)  # fmt: skip
                    run = _run_worker(job, args.in_process)
                    run["rep"] = rep
                    if args.in_process:
                        run["peak_rss_mb"] = None  # one process for all: its peak is not this variant's
                    runs.append(run)
                    print(
                        f"[{time.perf_counter() - started:6.0f} s] {model} {variant:9s} rep {rep}: "
                        f"median step {harness.median(run['step_times']):.3f} s "
                        f"({harness.median(run['step_cpu_times']):.3f} CPU s), peak RSS {_num(run['peak_rss_mb'], '.0f')} MiB, "
                        f"load {run['loadavg_end'][0]}",
                        flush=True,
                    )
            summary = summarize(runs)
            results["models"][model] = {
                "summary": summary, "ratios": ratios(summary), "runs": runs, "command": command,
                "settings": results["settings"], "loadavg_end": harness.loadavg(),
            }  # fmt: skip
    results["models"] = earlier.get("models", {}) | results["models"]
    if args.import_reps:
        results["import_s"] = import_times(args.import_reps)
    elif "import_s" in earlier:
        results["import_s"] = earlier["import_s"]
    results["loadavg_end"] = harness.loadavg()
    results["wall_s"] = time.perf_counter() - started
    text = markdown(results)
    json_path, md_path = harness.write_results(out_dir, "train_cost", results, text)
    harness.update_headline(out_dir, "train_cost_headline", headline(results))
    print(text)
    print(f"\nwrote {json_path} and {md_path} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
