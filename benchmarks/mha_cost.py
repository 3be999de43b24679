"""What LoRA on nn.MultiheadAttention and the dead-adapter guard cost, on Lightning's demo Transformer.

The attention adapters enter through the weights (``lightning_lora/mha.py``): every forward
materialises ``ΔW = s·B·A`` for the packed in-projection (3·d × d) and for ``out_proj``
(d × d), ``4·d²·r`` multiply-adds per attention module, plus the same again in backward,
and swaps the weights in with ``torch.func.functional_call``. This script times, on
``lightning.pytorch.demos.transformer.Transformer`` (default sizes: d = 200, 2 + 2 layers,
6 attention modules, dropout 0.2) with ``LoRAConfig(target_modules="all-linear", r=8)``:

* a full training step (forward, backward, SGD step over all parameters, as the demo's
  ``configure_optimizers`` does) at the demo's batch (1 × 35 tokens) and at 16 × 35;
* the ΔW part alone: ``delta_weight()`` of all attention adapters, forward and backward;
* the wrapper's overhead: an attention forward through the LoRA wrapper minus a plain
  ``nn.MultiheadAttention`` forward with the same effective weights;
* the dead-adapter guard: :func:`~lightning_lora.find_dead_adapters` after a backward (once
  per fit) and a first step with the forward-call recorder on, against one without.

Usage: ``python benchmarks/mha_cost.py`` (writes ``results/mha_cost.{json,md}`` and the
README block) or ``--quick`` (tiny, to a temporary directory).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.demos.transformer import Transformer

sys.path.insert(0, str(Path(__file__).parent))
from harness import RESULTS_DIR, md_table, set_threads, write_results  # noqa: E402
from harness import timed as _median_time  # noqa: E402


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds after two warm-up runs."""
    return _median_time(fn, reps, warmup=2)

from lightning_lora import LoRAConfig, LoRAMultiheadAttention, find_dead_adapters, inject_lora, lora_layers  # noqa: E402
from lightning_lora.guard import ForwardCallRecorder  # noqa: E402


def build(vocab: int, ninp: int, nhid: int, r: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(vocab_size=vocab, ninp=ninp, nhid=nhid)
    inject_lora(model, LoRAConfig(target_modules="all-linear", r=r))
    with torch.no_grad():  # trained adapters: B ≠ 0
        for layer in lora_layers(model).values():
            for name, param in layer.adapter_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
    return model.train()


def measure(vocab: int, ninp: int, nhid: int, r: int, batches: list[int], seq: int, reps: int) -> dict[str, Any]:
    model = build(vocab, ninp, nhid, r)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the demo's: all parameters
    attention = [m for m in lora_layers(model).values() if isinstance(m, LoRAMultiheadAttention)]
    out: dict[str, Any] = {"d_model": ninp, "r": r, "vocab": vocab, "attention_modules": len(attention), "steps": {}}

    def step(tokens: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(model(tokens, tokens), tokens.view(-1))
        loss.backward()
        optimizer.step()

    for batch in batches:
        tokens = torch.randint(0, vocab, (batch, seq))
        out["steps"][f"{batch}x{seq}"] = timed(lambda: step(tokens), reps)

    def delta_fwd_bwd() -> None:
        deltas = [m.delta_weight() for m in attention] + [m.out_adapter.delta_weight() for m in attention]
        torch.autograd.backward(deltas, [torch.ones_like(d) for d in deltas])

    out["delta_weight_fwd_bwd"] = timed(delta_fwd_bwd, reps)
    out["delta_macs_per_step"] = 2 * len(attention) * 4 * ninp * ninp * r  # forward + backward (one of the two)

    # wrapper overhead per attention call: LoRA wrapper vs plain MHA holding W + ΔW
    wrapper = attention[0]
    plain = copy.deepcopy(wrapper.base_layer)
    with torch.no_grad():
        plain.in_proj_weight += wrapper.delta_weight()
        plain.out_proj = plain.out_proj.base_layer
        plain.out_proj.weight += wrapper.out_adapter.delta_weight()
    x = torch.randn(batches[0], seq, ninp)
    out["attention_call_lora"] = timed(lambda: wrapper(x, x, x, need_weights=False)[0].sum().backward(), reps * 5)
    plain.requires_grad_(True)
    out["attention_call_plain"] = timed(lambda: plain(x, x, x, need_weights=False)[0].sum().backward(), reps * 5)

    # the guard: one pass over adapter grads, and the recorder's hooks during the first step
    tokens = torch.randint(0, vocab, (batches[0], seq))
    step(tokens)
    out["guard_check"] = timed(lambda: find_dead_adapters(model), reps * 5)
    assert find_dead_adapters(model) == {}
    recorder = ForwardCallRecorder(model)
    recorder.start()
    out["step_with_recorder"] = timed(lambda: step(tokens), reps)
    recorder.stop()
    out["step_without_recorder"] = timed(lambda: step(tokens), reps)
    out["adapter_tensors"] = sum(1 for m in lora_layers(model).values() for _ in m.adapter_parameters())
    return out


def markdown(res: dict[str, Any]) -> str:
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    rows = [
        [f"training step, batch {k} tokens", ms(v), ""] for k, v in res["steps"].items()
    ]
    first = next(iter(res["steps"].values()))
    rows += [
        [
            f"ΔW of {res['attention_modules']} attention modules, fwd + bwd",
            ms(res["delta_weight_fwd_bwd"]),
            ", ".join(f"{100 * res['delta_weight_fwd_bwd'] / t:.1f}% of the {k} step" for k, t in res["steps"].items()),
        ],
        ["one attention call fwd + bwd, LoRA wrapper", ms(res["attention_call_lora"]), ""],
        [
            "one attention call fwd + bwd, plain MHA with W + ΔW",
            ms(res["attention_call_plain"]),
            f"wrapper overhead {ms(res['attention_call_lora'] - res['attention_call_plain'])} ms per call",
        ],
        [
            f"dead-adapter check ({res['adapter_tensors']} adapter tensors), once per fit",
            ms(res["guard_check"]),
            f"{100 * res['guard_check'] / first:.2f}% of one step",
        ],
        [
            "first step with the forward-call recorder",
            ms(res["step_with_recorder"]),
            f"vs {ms(res['step_without_recorder'])} ms without",
        ],
    ]
    return (
        f"Demo `Transformer` (d = {res['d_model']}, vocab {res['vocab']}), `all-linear`, r = {res['r']}; "
        f"ΔW costs {res['delta_macs_per_step'] / 1e6:.1f} M multiply-adds per step.\n\n"
        + md_table(["what", "ms (median)", "note"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results to a temporary directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.quick:
        res = measure(vocab=50, ninp=16, nhid=16, r=2, batches=[1], seq=8, reps=2)
        out_dir = Path(tempfile.mkdtemp())
    else:
        res = measure(vocab=33278, ninp=200, nhid=200, r=8, batches=[1, 16], seq=35, reps=15)
        out_dir = RESULTS_DIR
    text = markdown(res)
    write_results(out_dir, "mha_cost", res, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
