"""Search the LoRA recipe for the GLUE benchmark: one ``fit`` per call, every result kept.

Each call runs one LoRA ``fit`` of ``benchmarks/glue_quality.py`` (the same task config and
``lora.yaml``, with your overrides on top), appends its row to
``results/glue_recipe_search.jsonl`` and rewrites ``results/glue_recipe_search.md`` (and its
block in ``benchmarks/README.md``) from every row recorded so far, best first per task. This is
how the learning rates and targets of ``configs/benchmarks/glue/lora*.yaml`` were chosen::

    python benchmarks/glue_recipe_search.py sst2 all-1e-3 --lora.target_modules all-linear \\
        --model.init_args.learning_rate 1e-3

``--render`` only rewrites the table. About 2-3 min per SST-2 call on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import glue_quality
import harness

NAME = "glue_recipe_search"


def render(rows: list[dict[str, Any]]) -> str:
    """Every recorded run, per task best first by its first metric."""
    table = []
    for task, (_, metrics) in glue_quality.TASKS.items():
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: -r["final"][metrics[0]])
        for r in mine:
            overrides = " ".join(r["overrides"]) or "(lora.yaml as is)"
            table.append([
                task, r["name"], f"`{overrides}`", ", ".join(f"{m} {100 * r['final'][m]:.2f}" for m in metrics),
                f"{r['trainable_params']:,}", f"{r['train_s']:.0f}", r["steps"],
            ])  # fmt: skip
    return (
        "LoRA runs of `benchmarks/glue_quality.py`'s budget (task config + `configs/benchmarks/glue/lora.yaml`, seed 0, "
        "dev metrics ×100 after the last epoch), each with the overrides given on top:\n\n"
        + harness.md_table(["task", "name", "overrides", "dev", "trainable", "train s", "steps"], table)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?", choices=list(glue_quality.TASKS))
    parser.add_argument("name", nargs="?", help="a short name for this recipe")
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--out-dir", default=str(harness.RESULTS_DIR))
    parser.add_argument("--render", action="store_true", help="rewrite the table from the recorded rows, run nothing")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out_dir)
    log = out / f"{NAME}.jsonl"
    if not args.render:
        if not (args.task and args.name):
            parser.error("give a task and a name for the recipe (or --render)")
        with tempfile.TemporaryDirectory() as root:
            row = glue_quality.fit(args.task, "lora", args.glue_dir, root, overrides)
        row |= {"name": args.name, "overrides": overrides, "loadavg_end": harness.loadavg()}
        print(f"{args.task} {args.name}: {row['final']} ({row['train_s']:.0f} s)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    text = render(rows)
    md = out / f"{NAME}.md"
    md.write_text(text + "\n")
    if out.resolve() == harness.RESULTS_DIR.resolve():  # benchmarks/README.md, as write_results does
        harness.update_readme(harness.RESULTS_DIR.parent / "README.md", NAME, text)
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    main()
