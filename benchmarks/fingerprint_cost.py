"""Cost of the base-model fingerprint (``lightning_lora.base_fingerprint``) on a BERT-base-size model.

Every adapter-only checkpoint and PEFT adapter file records it, and every load computes it
again, so it must stay cheap: the target is at most 50 ms for BERT-base (12 layers, hidden
768, 110M parameters) with LoRA on all linear layers (73 modules, 85M base weights). The
model has BERT-base's default sizes with random weights (the cost does not depend on the
values). Times are the median, min and max of ``--repeats`` calls after one warm-up call.

Run (CPU, ~20 s, most of it building the model)::

    python benchmarks/fingerprint_cost.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import RESULTS_DIR, md_table, median, model_spec, set_threads, write_results  # noqa: E402

from lightning_lora import LoRAConfig, base_fingerprint, inject_lora, lora_layers  # noqa: E402


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    model = model_spec("bert-base").build()
    inject_lora(model, LoRAConfig(r=8, target_modules="all-linear"))
    modules = len(lora_layers(model))
    base_params = sum(layer.base_layer.weight.numel() for layer in lora_layers(model).values())
    rows, results = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(device=args.device, dtype=dtype)
        times = time_calls(lambda: base_fingerprint(model), args.repeats)
        result = {
            "dtype": str(dtype).removeprefix("torch."),
            "device": args.device,
            "median_ms": round(median(times), 2),
            "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2),
        }
        results.append(result)
        rows.append(
            [f"BERT-base, all-linear ({modules} modules, {base_params / 1e6:.0f}M base weights)", result["dtype"],
             args.device, result["median_ms"], result["min_ms"], result["max_ms"]]
        )  # fmt: skip
    markdown = md_table(["model", "dtype", "device", "median ms", "min ms", "max ms"], rows)
    markdown += "\n\nTarget: at most 50 ms. The fingerprint samples 1024 values per adapted module, so its cost grows\n"
    markdown += "with the number of adapted modules, not with their size."
    write_results(args.out, "fingerprint_cost", {"threads": threads, "modules": modules, "results": results}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
