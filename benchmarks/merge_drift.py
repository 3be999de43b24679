"""Drift of base weights after repeated merge/unmerge, bf16 vs fp32.

Each merge adds ΔW = s·B A computed in float32 and casts the sum back to the weight's
dtype; unmerge subtracts it the same way. In fp32 the round trip is nearly exact; in bf16
every cast rounds to 8 mantissa bits, so the error can accumulate over cycles. This
script measures it on a 256x256 ``nn.Linear`` and on a tiny Llama (all linear layers),
r=8, alpha=16, non-zero B.

Run (CPU, ~10 s)::

    python benchmarks/merge_drift.py --cycles 100 --out merge_drift.json

Writes the numbers as JSON and prints a markdown table. ``max_abs`` is the largest
``|W_after - W_before|``; ``rel_max`` divides it by ``max |W_before|``; ``rel_fro`` is
``‖W_after - W_before‖_F / ‖W_before‖_F``; ``delta_max`` is ``max |ΔW|`` for scale.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_layers, merge_lora, unmerge_lora


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256))


def llama_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def measure(build: Callable[[], nn.Module], dtype: torch.dtype, cycles: int, b_std: float) -> dict[str, float]:
    model = inject_lora(build().to(dtype), LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    layers = lora_layers(model).values()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * b_std)
    before = [layer.base_layer.weight.detach().float().clone() for layer in layers]
    delta_max = max(layer.delta_weight().abs().max().item() for layer in layers)
    for _ in range(cycles):
        merge_lora(model)
        unmerge_lora(model)
    after = [layer.base_layer.weight.detach().float() for layer in layers]
    drift = [a - b for a, b in zip(after, before)]
    max_abs = max(d.abs().max().item() for d in drift)
    w_max = max(b.abs().max().item() for b in before)
    fro = torch.cat([d.flatten() for d in drift]).norm().item() / torch.cat([b.flatten() for b in before]).norm().item()
    changed = sum(int((d != 0).sum()) for d in drift) / sum(d.numel() for d in drift)
    return {
        "max_abs": max_abs,
        "rel_max": max_abs / w_max,
        "rel_fro": fro,
        "changed_frac": changed,
        "delta_max": delta_max,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--b_std", type=float, default=0.02, help="std of the random (non-zero) B matrices")
    parser.add_argument("--out", default="merge_drift.json")
    args = parser.parse_args()
    rows = []
    for model_name, build in (("Linear 256x256", linear_model), ("tiny Llama (all-linear)", llama_model)):
        for dtype in (torch.float32, torch.bfloat16):
            for cycles in (1, args.cycles):
                row = {"model": model_name, "dtype": str(dtype).removeprefix("torch."), "cycles": cycles}
                row.update(measure(build, dtype, cycles, args.b_std))
                rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"r": 8, "alpha": 16, "b_std": args.b_std, "rows": rows}, f, indent=2)
    print("| model | dtype | cycles | max abs drift | rel (max) | rel (Frobenius) | weights changed | max abs ΔW |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['cycles']} | {r['max_abs']:.3g} | {r['rel_max']:.3g} | "
            f"{r['rel_fro']:.3g} | {r['changed_frac']:.1%} | {r['delta_max']:.3g} |"
        )


if __name__ == "__main__":
    main()
