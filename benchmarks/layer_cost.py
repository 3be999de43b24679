"""Cost of one LoRA dense layer, forward + backward: frozen base vs lightning-lora vs PEFT.

Isolates what ``train_cost.py`` measures on whole models: one ``nn.Linear`` (frozen) with
r=8 on a (16 × 128)-token input that requires grad, variants interleaved:

* ``frozen``: the base layer alone (the bound: input gradient only);
* ``ours``: ``LoRALinear`` (base and update in one autograd node, ``lightning_lora.fused``);
* ``ours, module path``: the same layer through ``LoRALayer.forward`` (base, A, B, scale and
  add as separate modules: what ``ours`` replaced);
* ``PEFT``: ``peft.get_peft_model`` on the same layer.

CPU seconds of this process (``time.process_time``) are reported next to wall time: with
one thread they barely move when other users load the machine.

Run (about 2 min)::

    python benchmarks/layer_cost.py
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any, Callable

import harness
import peft
import torch
from torch import nn

from lightning_lora import LoRAConfig, LoRALayer, inject_lora


def variants(in_features: int, out_features: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_features, out_features))
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules=["0"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    frozen = copy.deepcopy(base).requires_grad_(False)
    return {
        "frozen": frozen,
        "ours": ours,
        "ours, module path": lambda x: LoRALayer.forward(ours[0], x),
        "PEFT": theirs,
    }


def measure(shape: tuple[int, int], tokens: int, reps: int) -> dict[str, dict[str, float]]:
    fns = variants(*shape)
    x = torch.randn(tokens, shape[0], requires_grad=True)
    grad = torch.randn(tokens, shape[1])
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps + 1):  # the first round warms up
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name](x).backward(grad)
            if rep:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    frozen_cpu = harness.median(cpu["frozen"])
    peft_cpu = harness.median(cpu["PEFT"])
    return {
        name: {"wall_ms": 1e3 * harness.median(wall[name]), "cpu_ms": 1e3 * harness.median(cpu[name]),
               "cpu_vs_frozen": harness.median(cpu[name]) / frozen_cpu,
               "cpu_vs_peft": harness.median(cpu[name]) / peft_cpu}  # fmt: skip
        for name in fns
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: robust CPU time)")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--out-dir", help="default: benchmarks/results (a temporary directory with --quick)")
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    shapes = [(32, 32)] if args.quick else [(384, 384), (384, 1536), (768, 768), (768, 3072)]
    tokens, reps = (64, args.reps or 3) if args.quick else (16 * 128, args.reps or 30)
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="layer_cost_") if args.quick else harness.RESULTS_DIR)
    results: dict[str, Any] = {"settings": {"threads": threads, "tokens": tokens, "reps": reps, "r": 8},
                               "loadavg_start": harness.loadavg(), "rows": []}  # fmt: skip
    rows = []
    for shape in shapes:
        for name, m in measure(shape, tokens, reps).items():
            results["rows"].append({"in": shape[0], "out": shape[1], "variant": name, **m})
            rows.append([f"{shape[0]}→{shape[1]}", name, f"{m['wall_ms']:.2f}", f"{m['cpu_ms']:.2f}",
                         f"{m['cpu_vs_frozen']:.3f}", f"{m['cpu_vs_peft']:.3f}"])  # fmt: skip
        print(f"{shape} done, load {harness.loadavg()[0]}", flush=True)
    results["loadavg_end"] = harness.loadavg()
    text = (
        f"One frozen `nn.Linear` + LoRA r=8, forward + backward on {tokens} tokens, {threads} thread(s), "
        f"median of {reps} interleaved repetitions.\n\n"
        + harness.md_table(["layer", "variant", "wall ms", "CPU ms", "CPU vs frozen", "CPU vs PEFT"], rows)
    )
    json_path, md_path = harness.write_results(out_dir, "layer_cost", results, text)
    print(text)
    print(f"\nwrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()
