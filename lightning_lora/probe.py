"""Where to put the adapters: a short gradient probe that ranks modules and proposes ``target_modules`` and ``r``.

The LoRA paper asks which weight matrices to adapt under a parameter budget (Section 7.1,
Table 5) and lists principled ways to choose them as future work. This probe scores every
candidate module on a few batches of the user's own data:

    score(m) = mean over batches of ‖∂L/∂B_m‖²_F   at B_m = 0, A_m random (Kaiming, seeded), r = ``probe_r``

At B = 0 the model is still the base model, and ``‖∂L/∂B‖²_F`` is the first-order decrease of
the loss from one unit gradient step on that adapter alone: how much the task can be served
through this module's low-rank update right now. No optimizer step is taken; the user's module
is not changed (the probe works on a copy, in eval mode so dropout does not add noise).

Modules of one *kind* (the same name in every layer, e.g. ``attention.self.value``) are pooled,
and kinds are ranked by score per trainable parameter, ``Σ score / Σ (d_in + d_out)``. The
suggestion takes kinds in that order until they hold ``coverage`` of the total score, and then
the largest r that fits the budget (``r · Σ (d_in + d_out) ≤ budget``, at most ``r_max``); if
that r is below ``r_min``, the lowest-ranked kinds are dropped until it is not. The budget
counts adapter parameters (A and B) only, not ``modules_to_save``.

Whether this beats the paper's q, v default is measured in ``benchmarks/suggest_targets.py``.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_lora.analysis import module_layer_and_kind, short_kind
from lightning_lora.config import ALL_LINEAR, LoRAConfig, TargetSpec
from lightning_lora.inject import inject_lora, lora_layers
from lightning_lora.layers import LoRAEmbedding


@dataclass
class KindScore:
    """The probe's numbers for one module kind (all its layers pooled)."""

    kind: str
    modules: list[str]
    score: float
    cost_per_rank: int

    @property
    def density(self) -> float:
        """Score per trainable adapter parameter at r = 1: the ranking key."""
        return self.score / self.cost_per_rank


@dataclass
class TargetSuggestion:
    """What the probe proposes, with the numbers behind it.

    Attributes:
        target_modules: A full-match regex selecting the chosen modules (every layer of each kind).
        r: The rank that fits the budget.
        trainable_params: ``r · Σ (d_in + d_out)`` over the chosen modules.
        budget: The budget asked for.
        kinds: Every probed kind, best first; ``chosen`` says which were taken.
        chosen: Names of the chosen kinds.
        base: The LoRA options kept from the user's config (alpha scaled with r, dropout, modules_to_save, ...).
    """

    target_modules: str
    r: int
    trainable_params: int
    budget: int
    kinds: list[KindScore]
    chosen: list[str]
    base: LoRAConfig

    def config(self) -> LoRAConfig:
        """The suggested :class:`LoRAConfig` (alpha = 2 r unless the user's alpha / r ratio differs)."""
        ratio = self.base.alpha / self.base.r
        return LoRAConfig(**{**self.base.to_dict(), "r": self.r, "alpha": ratio * self.r,
                             "target_modules": self.target_modules, "exclude_modules": None})  # fmt: skip

    def yaml(self) -> str:
        """A ready-to-paste ``lora:`` block for a ``lightning-lora fit`` config."""
        cfg = self.config()
        lines = [
            f"# suggested by the target probe: {self.trainable_params:,} adapter parameters (budget {self.budget:,})",
            "lora:",
            f"  r: {cfg.r}",
            f"  alpha: {cfg.alpha:g}",
            f"  target_modules: '{cfg.target_modules}'",
        ]
        if cfg.dropout:
            lines.append(f"  dropout: {cfg.dropout:g}")
        if cfg.modules_to_save:
            lines.append(f"  modules_to_save: [{', '.join(cfg.modules_to_save)}]")
        if cfg.use_rslora:
            lines.append("  use_rslora: true")
        return "\n".join(lines)

    def table(self) -> str:
        """The ranking as plain text: kind, modules, score, cost per rank, score per parameter."""
        rows = [f"{'kind':<36} {'modules':>7} {'score':>11} {'d_in+d_out':>10} {'score/param':>11}  chosen"]
        for k in self.kinds:
            mark = "yes" if k.kind in self.chosen else ""
            rows.append(f"{short_kind(k.kind):<36} {len(k.modules):>7} {k.score:>11.4g} {k.cost_per_rank:>10} "
                        f"{k.density:>11.4g}  {mark}")  # fmt: skip
        return "\n".join(rows)


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            "The probe needs `training_step` (or `step_fn`) to return the scalar loss, or a dict with `loss`; "
            f"got {type(output).__name__}."
        )
    return loss


def score_modules(
    module: nn.Module,
    batches: Iterable[Any],
    candidates: TargetSpec = ALL_LINEAR,
    num_batches: int = 8,
    probe_r: int = 8,
    seed: int = 0,
    base: Optional[LoRAConfig] = None,
    step_fn: Optional[Callable[[nn.Module, Any, int], Any]] = None,
) -> list[KindScore]:
    """Score every candidate module (see the module docstring) and pool by kind, best score per parameter first.

    Args:
        module: The user's model (a LightningModule, or any module with ``step_fn``); not modified.
        batches: Training batches (e.g. a ``DataLoader``); the first ``num_batches`` are used.
        candidates: Which modules may be chosen (``target_modules`` syntax).
        base: The user's LoRA options: ``exclude_modules`` and ``modules_to_save`` are respected.
        step_fn: ``(model, batch, batch_idx) -> loss``; default ``model.training_step``.
    """
    base = base or LoRAConfig()
    probe = copy.deepcopy(module).eval()
    torch.manual_seed(seed)  # the random A of every probe adapter
    config = LoRAConfig(r=probe_r, target_modules=candidates, exclude_modules=base.exclude_modules,
                        modules_to_save=base.modules_to_save, mha_projections=base.mha_projections)  # fmt: skip
    inject_lora(probe, config)
    b_params: dict[str, nn.Parameter] = {}
    cost: dict[str, int] = {}
    for name, layer in lora_layers(probe).items():
        params = dict(layer.adapter_parameters())
        if not params:
            continue  # an attention module adapted only through its out_proj (its own entry)
        key_b = "lora_embedding_B" if isinstance(layer, LoRAEmbedding) else "lora_B.weight"
        for key, p in params.items():
            p.requires_grad_(key == key_b)
        b_params[name] = params[key_b]
        cost[name] = sum(p.numel() for p in params.values()) // layer.r
    for p in probe.parameters():
        if all(p is not b for b in b_params.values()):
            p.requires_grad_(False)
    totals = dict.fromkeys(b_params, 0.0)
    step = step_fn or (lambda model, batch, i: model.training_step(batch, i))
    seen = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer is attached to the copy
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            for p in b_params.values():
                p.grad = None
            _loss_of(step(probe, batch, i)).backward()
            for name, p in b_params.items():
                totals[name] += 0.0 if p.grad is None else float(p.grad.double().square().sum())
            seen += 1
    if seen == 0:
        raise ValueError("The probe got no batches: the data loader is empty.")
    kinds: dict[str, KindScore] = {}
    for name in b_params:
        kind = module_layer_and_kind(name)[1]
        entry = kinds.setdefault(kind, KindScore(kind, [], 0.0, 0))
        entry.modules.append(name)
        entry.score += totals[name] / seen
        entry.cost_per_rank += cost[name]
    return sorted(kinds.values(), key=lambda k: k.density, reverse=True)


def choose_targets(
    kinds: list[KindScore], budget: int, base: Optional[LoRAConfig] = None, coverage: float = 0.8,
    r_min: int = 2, r_max: int = 64,
) -> TargetSuggestion:  # fmt: skip
    """Pick kinds and r from the scores (rule in the module docstring)."""
    if not kinds:
        raise ValueError("No candidate modules were scored.")
    if not 0 < coverage <= 1:
        raise ValueError(f"`coverage` must be in (0, 1], got {coverage}.")
    total = sum(k.score for k in kinds) or 1.0
    chosen: list[KindScore] = []
    for k in kinds:
        chosen.append(k)
        if sum(c.score for c in chosen) >= coverage * total:
            break
    while len(chosen) > 1 and budget // sum(c.cost_per_rank for c in chosen) < r_min:
        chosen.pop()
    cost = sum(c.cost_per_rank for c in chosen)
    r = min(r_max, budget // cost)
    if r < 1:
        raise ValueError(
            f"A budget of {budget:,} adapter parameters is too small: the best module kind "
            f"`{short_kind(chosen[0].kind)}` needs {cost:,} at r = 1. Raise --budget."
        )
    names = [n for c in chosen for n in c.modules]
    return TargetSuggestion(_regex_for(names), int(r), int(r * cost), budget, kinds, [c.kind for c in chosen],
                            base or LoRAConfig())  # fmt: skip


def _regex_for(names: list[str]) -> str:
    """A full-match regex for ``names``, with the layer index of each name as ``\\d+``."""
    patterns = []
    for name in names:
        layer, _ = module_layer_and_kind(name)
        parts = [re.escape(p) for p in name.split(".")]
        if layer is not None:
            at = max(i for i, p in enumerate(name.split(".")) if p.isdigit())
            parts[at] = r"\d+"
        pattern = r"\.".join(parts)
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns[0] if len(patterns) == 1 else "(?:" + "|".join(patterns) + ")"


def suggest_targets(
    module: nn.Module,
    batches: Iterable[Any],
    budget: int,
    candidates: TargetSpec = ALL_LINEAR,
    base: Optional[LoRAConfig] = None,
    num_batches: int = 8,
    probe_r: int = 8,
    seed: int = 0,
    coverage: float = 0.8,
    step_fn: Optional[Callable[[nn.Module, Any, int], Any]] = None,
) -> TargetSuggestion:
    """Probe ``module`` on a few ``batches`` and propose ``target_modules`` and ``r`` within ``budget``.

    Example::

        suggestion = suggest_targets(MyModule(), datamodule.train_dataloader(), budget=80_000)
        print(suggestion.yaml())                      # a `lora:` block for the fit config
        trainer = L.Trainer(callbacks=[LoRACallback(config=suggestion.config())])
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"`budget` must be a positive number of adapter parameters, got {budget!r}.")
    kinds = score_modules(module, batches, candidates, num_batches, probe_r, seed, base, step_fn)
    return choose_targets(kinds, budget, base, coverage)


def suggest_targets_from_config(
    fit_config: Optional[str], budget: Optional[int], candidates: TargetSpec = ALL_LINEAR, num_batches: int = 8
) -> TargetSuggestion:
    """:func:`suggest_targets` on the model, data and ``lora:`` options of a ``lightning-lora fit`` config file."""
    if fit_config is None or budget is None:
        raise ValueError("--suggest_targets needs --budget (adapter parameters) and --fit_config (a fit config file).")
    from lightning_lora.callback import LoRACallback
    from lightning_lora.cli import LoRACLI

    cli = LoRACLI(args=["--config", fit_config, "--trainer.logger", "false"], run=False)
    lora = next((c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)), None)
    datamodule = cli.datamodule
    if datamodule is None:
        raise ValueError(f"{fit_config} has no `data:` section; the probe needs training batches.")
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = cli.model
    if not any(True for _ in module.parameters()):
        module.configure_model()
    return suggest_targets(module, datamodule.train_dataloader(), budget, candidates,
                           lora.config if lora else None, num_batches)  # fmt: skip


__all__ = ["KindScore", "TargetSuggestion", "choose_targets", "score_modules", "suggest_targets",
           "suggest_targets_from_config"]  # fmt: skip
