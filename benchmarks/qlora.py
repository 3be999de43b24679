"""QLoRA vs LoRA vs full fine-tuning on CPU: base weight memory, peak RSS, step time, quantization error.

Each (variant, repetition) trains in a fresh process (so peak RSS is per variant), variants
interleaved and rotated each repetition, on the same fixed batch with AdamW:

- ``full``: every weight trains (fp32);
- ``lora``: ``inject_lora`` on the targets, fp32 base (fused LoRA path);
- ``qlora``: ``quantize_base`` (NF4, double quantization, fp32 compute), then the same adapters.

Quantization error (in this process): the same trained-looking adapters (B drawn at random,
seeded) on the fp32 base and on the 4-bit base, and the merged full-precision export of the
4-bit model (dequantize → merge in fp32) against the fp32 adapted model.

    python benchmarks/qlora.py                   # all-MiniLM-L6-v2, ~5 min on 2 idle cores
    python benchmarks/qlora.py --quick           # tiny model, seconds, results to a temp dir
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    RESULTS_DIR,
    current_rss_mb,
    loadavg,
    md_table,
    median,
    model_spec,
    peak_rss_mb,
    set_threads,
    token_batch,
    write_results,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from lightning_lora import dequantize_base, inject_lora, lora_layers, merge_lora, quantize_base  # noqa: E402
from lightning_lora.quantize import weight_bytes  # noqa: E402

VARIANTS = ("full", "lora", "qlora")


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def build(variant: str, spec_name: str, r: int) -> torch.nn.Module:
    spec = model_spec(spec_name)
    model = spec.build().train()
    if variant == "qlora":
        quantize_base(model, "nf4", double_quant=True, skip=spec.modules_to_save or (), device="cpu")
    if variant != "full":
        inject_lora(model, r=r, alpha=2 * r, target_modules=list(spec.qv_targets), modules_to_save=spec.modules_to_save)
    return model


def worker(variant: str, spec_name: str, r: int, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one variant; return its timings and memory."""
    threads = set_threads(None)
    rss_imports = current_rss_mb()
    model = build(variant, spec_name, r)
    data = token_batch(model_spec(spec_name), batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, cpu_times = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        _loss(model, data).backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return {
        "variant": variant,
        "threads": threads,
        "step_times_s": times,
        "cpu_times_s": cpu_times,
        "linear_weight_bytes": weight_bytes(model),
        "trainable_params": sum(p.numel() for p in params),
        "peak_minus_imports_mb": round(peak_rss_mb() - rss_imports, 1),
        "loadavg": loadavg(),
    }


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    if args.in_process:
        return worker(variant, args.model, args.r, args.batch, args.seq, args.steps, args.warmup)
    cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--r", str(args.r)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def quantization_error(spec_name: str, r: int, batch: int, seq: int) -> list[dict[str, Any]]:
    """Logit errors of the 4-bit model and of its merged fp32 export against the fp32 adapted model."""
    spec = model_spec(spec_name)
    data = token_batch(spec, batch, seq, seed=1)
    inputs = {"input_ids": data["input_ids"]}
    reference = build("lora", spec_name, r).eval()
    torch.manual_seed(2)
    for layer in lora_layers(reference).values():
        layer.lora_B.weight.normal_(std=0.02)  # adapters that changed something
    adapters = {k: v for k, v in reference.state_dict().items() if ".lora_" in k or "modules_to_save" in k}
    ref_out = reference(**inputs).logits
    scale = ref_out.abs().max().item()
    rows = []
    for quant_type, double_quant in (("nf4", True), ("nf4", False), ("fp4", True)):
        spec_model = spec.build().eval()
        quantize_base(spec_model, quant_type, double_quant, skip=spec.modules_to_save or (), device="cpu")
        inject_lora(spec_model, r=r, alpha=2 * r, target_modules=list(spec.qv_targets), modules_to_save=spec.modules_to_save)
        missing = spec_model.load_state_dict(adapters, strict=False)
        assert not missing.unexpected_keys
        q_out = spec_model(**inputs).logits
        merged = copy.deepcopy(spec_model)
        merge_lora(merged, unload=True)
        dequantize_base(merged)
        m_out = merged(**inputs).logits
        rows.append({
            "quant_type": quant_type,
            "double_quant": double_quant,
            "qlora_vs_fp32_max_abs": (q_out - ref_out).abs().max().item(),
            "merged_vs_fp32_max_abs": (m_out - ref_out).abs().max().item(),
            "merged_vs_fp32_rel": (m_out - ref_out).abs().max().item() / scale,
            "merged_vs_qlora_max_abs": (m_out - q_out).abs().max().item(),
            "argmax_agreement": (m_out.argmax(-1) == ref_out.argmax(-1)).float().mean().item(),
        })
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        out[variant] = {
            "step_time_s": median([t for run in mine for t in run["step_times_s"]]),
            "cpu_time_s": median([t for run in mine for t in run["cpu_times_s"]]),
            "linear_weight_mb": mine[0]["linear_weight_bytes"] / 2**20,
            "peak_minus_imports_mb": median([run["peak_minus_imports_mb"] for run in mine]),
            "trainable_params": mine[0]["trainable_params"],
            "measured_steps": sum(len(run["step_times_s"]) for run in mine),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny-bert, 1 rep, results to a temporary directory")
    parser.add_argument("--in-process", action="store_true", help="no worker processes (peak RSS is then shared)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.r, args.batch, args.seq, args.steps, args.warmup)))
        return {}
    if args.quick:
        args.model, args.reps, args.steps, args.warmup, args.batch, args.seq = "tiny-bert", 1, 2, 1, 4, 16
    out_dir = args.out_dir or (tempfile.mkdtemp() if args.quick else RESULTS_DIR)
    runs = []
    for rep in range(args.reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        runs += [run_variant(args, variant) for variant in order]
    summary = summarize(runs)
    errors = quantization_error(args.model, args.r, args.batch, args.seq)
    ratios = {
        "qlora_base_weight_vs_fp32": summary["qlora"]["linear_weight_mb"] / summary["lora"]["linear_weight_mb"],
        "qlora_step_vs_lora": summary["qlora"]["step_time_s"] / summary["lora"]["step_time_s"],
        "qlora_cpu_vs_lora": summary["qlora"]["cpu_time_s"] / summary["lora"]["cpu_time_s"],
        "qlora_step_vs_full": summary["qlora"]["step_time_s"] / summary["full"]["step_time_s"],
    }
    data = {"model": args.model, "batch": args.batch, "seq": args.seq, "r": args.r, "summary": summary,
            "ratios": ratios, "quantization_error": errors, "runs": runs}  # fmt: skip
    rows = [
        [v, f"{s['step_time_s'] * 1000:.0f}", f"{s['cpu_time_s'] * 1000:.0f}", f"{s['linear_weight_mb']:.1f}",
         f"{s['peak_minus_imports_mb']:.0f}", s["trainable_params"]]
        for v, s in summary.items()
    ]  # fmt: skip
    err_rows = [
        [e["quant_type"], e["double_quant"], f"{e['qlora_vs_fp32_max_abs']:.2e}", f"{e['merged_vs_fp32_max_abs']:.2e}",
         f"{e['merged_vs_fp32_rel']:.1%}", f"{e['merged_vs_qlora_max_abs']:.1e}", f"{e['argmax_agreement']:.0%}"]
        for e in errors
    ]  # fmt: skip
    markdown = "\n\n".join([
        f"Model `{args.model}`, batch {args.batch} × {args.seq} tokens, r={args.r} on {', '.join(model_spec(args.model).qv_targets)}, "
        f"{args.reps} reps × {args.steps} measured steps (medians), load average at the end {loadavg()}.",
        md_table(["variant", "ms / step", "CPU ms / step", "linear weights MiB", "peak − imports MiB", "trainable"], rows),
        "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()),
        "Quantization error of the logits against the fp32 adapted model (same adapters):",
        md_table(["quant", "double quant", "4-bit model", "merged export", "merged, relative", "merged vs 4-bit",
                  "same argmax"], err_rows),  # fmt: skip
    ])
    write_results(out_dir, "qlora", data, markdown)
    print(markdown)
    return data


if __name__ == "__main__":
    main()
