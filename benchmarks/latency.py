"""Inference latency: base model vs merged LoRA model vs unmerged adapters.

The LoRA paper's claim is "no additional inference latency" once ΔW = s·B A is merged into
W: the merged model is an ordinary model (here ``merge_lora(model, unload=True)``, the
same plain layers ``save_merged`` and the end of ``fit`` produce), so merged/base should
be 1.00 within noise. Unmerged adapters (``inject_lora`` without merging) pay for the two
thin matmuls per adapted layer; that overhead is reported too, for q/v and all-linear.

Every variant runs the same fixed batch under ``torch.inference_mode()`` in eval mode,
interleaved (the order rotates each repetition); the adapters have random, non-zero B so
merged and unmerged outputs are checked to agree.

Run (about 7 min on 2 idle cores)::

    python benchmarks/latency.py
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import harness
import torch
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_layers, merge_lora

R, ALPHA = 8, 16


def _with_adapters(base: nn.Module, targets: Any, seed: int = 0) -> nn.Module:
    model = inject_lora(copy.deepcopy(base), LoRAConfig(r=R, alpha=ALPHA, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    return model.eval()


def build_variants(model: str) -> dict[str, nn.Module]:
    """``base``, then unmerged and merged (plain layers) LoRA copies for q/v and all-linear."""
    spec = harness.model_spec(model)
    base = spec.build().eval()
    variants = {"base": base}
    for label, targets in (("q/v", list(spec.qv_targets)), ("all-linear", "all-linear")):
        unmerged = _with_adapters(base, targets)
        variants[f"merged {label}"] = merge_lora(copy.deepcopy(unmerged), unload=True)
        variants[f"unmerged {label}"] = unmerged
    return variants


@torch.inference_mode()
def time_variants(variants: dict[str, nn.Module], ids: torch.Tensor, calls: int, reps: int) -> dict[str, list[float]]:
    """Seconds per forward call of every variant; ``calls`` in a row per variant, interleaved over ``reps``."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up: first calls allocate and pick kernels
        variants[name](input_ids=ids)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for _ in range(calls):
                start = time.perf_counter()
                variants[name](input_ids=ids)
                times[name].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def merge_error(variants: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, float]:
    """max |merged − unmerged| of the logits, per target set (a merge that changed outputs shows here)."""
    out = {}
    for label in ("q/v", "all-linear"):
        merged, unmerged = variants[f"merged {label}"](input_ids=ids).logits, variants[f"unmerged {label}"](input_ids=ids).logits
        out[label] = (merged - unmerged).abs().max().item()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few calls: a smoke test")
    parser.add_argument("--models", nargs="+", help=f"from {', '.join(harness.MODELS)}")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seq", type=int)
    parser.add_argument("--reps", type=int, default=3, help="repetitions, variants interleaved within each")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--out-dir", help="default: benchmarks/results (a temporary directory with --quick)")
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    seq = args.seq or (16 if args.quick else 128)
    models = args.models or (["tiny-bert", "tiny-gpt2"] if args.quick else ["minilm", "bert-base", "gpt2-small"])
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="latency_") if args.quick else harness.RESULTS_DIR)
    results: dict[str, Any] = {
        "settings": {"seq": seq, "reps": args.reps, "threads": threads, "r": R, "alpha": ALPHA, "dtype": "float32"},
        "loadavg_start": harness.loadavg(),
        "rows": [],
    }
    started = time.perf_counter()
    for model in models:
        variants = build_variants(model)
        spec = harness.model_spec(model)
        for batch in args.batches:
            ids = harness.token_batch(spec, batch, seq)["input_ids"]
            calls = 2 if args.quick else (20 if batch == 1 else 3)
            times = time_variants(variants, ids, calls, args.reps)
            base = harness.median(times["base"])
            error = merge_error(variants, ids)
            for name, t in times.items():
                row = {"model": model, "batch": batch, "variant": name, "median_s": harness.median(t),
                       "calls": len(t), "vs_base": harness.median(t) / base}  # fmt: skip
                if name.startswith("merged"):
                    row["max_abs_vs_unmerged"] = error[name.removeprefix("merged ")]
                results["rows"].append(row)
            print(
                f"[{time.perf_counter() - started:5.0f} s] {model} batch {batch}: "
                + ", ".join(f"{n} {harness.median(t) * 1e3:.1f} ms" for n, t in times.items()),
                flush=True,
            )
        del variants
    results["loadavg_end"] = harness.loadavg()
    results["wall_s"] = time.perf_counter() - started
    rows = [
        [r["model"], r["batch"], r["variant"], f"{r['median_s'] * 1e3:.1f}", f"{r['vs_base']:.3f}",
         f"{r['max_abs_vs_unmerged']:.1e}" if "max_abs_vs_unmerged" in r else ""]
        for r in results["rows"]
    ]  # fmt: skip
    text = (
        f"fp32, sequence length {seq}, `torch.inference_mode()`, median of {args.reps} interleaved repetitions. "
        "LoRA r=8, alpha=16, random non-zero B.\n\n"
        + harness.md_table(["model", "batch", "variant", "ms / forward", "vs base", "max |merged − unmerged|"], rows)
    )
    json_path, md_path = harness.write_results(out_dir, "latency", results, text)
    print(text)
    print(f"\nwrote {json_path} and {md_path} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
