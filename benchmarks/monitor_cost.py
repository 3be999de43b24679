"""What ``LoRACallback(log_delta_every_n_steps=N)`` costs: the r×r-core metrics vs a training step vs forming ΔW.

For each model and rank: the median time of one training step (forward, backward, AdamW step on
the adapters and head; fixed batch, fp32), of :func:`lightning_lora.monitor.delta_metrics` (‖ΔW‖_F
and effective rank of every adapted module from the small factors) and, for comparison, of
forming every ΔW = s·BA and taking its singular values. The monitor runs once every N steps, so
its share of training time is ``metrics / (N · step)``.
"""

from __future__ import annotations

import argparse

import torch

from harness import RESULTS_DIR, md_table, model_spec, set_threads, timed, token_batch, write_results
from lightning_lora import LoRAConfig, inject_lora, lora_layers
from lightning_lora.analysis import layer_factors
from lightning_lora.monitor import delta_metrics


def measure(model_name: str, r: int, targets, batch: int, seq: int, reps: int) -> dict:
    spec = model_spec(model_name)
    model = spec.build().train()
    inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=targets, modules_to_save=spec.modules_to_save))
    with torch.no_grad():  # trained-like adapters: B is no longer zero
        for layer in lora_layers(model).values():
            for _, p in layer.adapter_parameters():
                p.normal_(0, 0.02)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = token_batch(spec, batch, seq)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    def full_svd() -> None:
        for name, layer in lora_layers(model).items():
            f = layer_factors(name, layer)
            torch.linalg.svdvals(f.lora_B @ f.lora_A * f.scaling)

    step()  # warm-up
    step_s = timed(step, reps)
    metrics_s = timed(lambda: delta_metrics(model), reps)
    full_s = timed(full_svd, max(1, reps // 2))
    return {
        "model": model_name, "r": r, "targets": targets if isinstance(targets, str) else list(targets),
        "modules": len(lora_layers(model)), "batch": f"{batch}x{seq}", "step_s": step_s, "metrics_s": metrics_s,
        "full_svd_s": full_s, "metrics_over_step": metrics_s / step_s,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds (writes to --out-dir)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    models = ["tiny-bert"] if args.quick else args.models
    rows = [measure(m, r, "all-linear", args.batch, args.seq, args.reps) for m in models for r in args.ranks]
    table = md_table(
        ["model", "adapted modules", "r", "train step (s)", "monitor metrics (s)", "metrics / step", "form ΔW + SVD (s)"],
        [[x["model"], x["modules"], x["r"], f"{x['step_s']:.3f}", f"{x['metrics_s']:.4f}",
          f"{100 * x['metrics_over_step']:.2f} %", f"{x['full_svd_s']:.3f}"] for x in rows],
    )  # fmt: skip
    markdown = table + "\n\nWith `log_delta_every_n_steps=N` the monitor adds `metrics / step / N` to training time.\n"
    write_results(args.out_dir, "monitor_cost", {"rows": rows}, markdown)
    print(markdown)
    return {"rows": rows}


if __name__ == "__main__":
    main()
