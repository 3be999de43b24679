"""Figures for :mod:`lightning_lora.analysis` (matplotlib, Agg backend: files only, no display needed).

* :func:`plot_spectra`: ΔW's singular values per layer, one panel per module kind;
* :func:`plot_norm_grid`: a layer × module-kind heatmap of ‖ΔW‖_F / ‖W‖_F (or ‖ΔW‖_F without W);
* :func:`plot_similarity`: φ(A₁, A₂, i, j) heatmaps like the LoRA paper's Figure 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_lora.analysis import ModuleReport, module_layer_and_kind, short_kind  # noqa: E402


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _kinds(reports: Sequence[ModuleReport]) -> list[str]:
    return list(dict.fromkeys(r.kind for r in reports))


def plot_spectra(reports: Sequence[ModuleReport], path: str | Path) -> Path:
    """Singular values σ_i of ΔW (log scale) against i, one line per layer, one panel per module kind."""
    kinds = _kinds(reports)
    rows, cols = _grid(len(kinds))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.flat, kinds):
        members = sorted((r for r in reports if r.kind == kind), key=lambda r: (r.layer is None, r.layer or 0))
        for k, report in enumerate(members):
            sigma = [s for s in report.singular_values if s > 0]
            label = f"layer {report.layer}" if report.layer is not None else report.name
            ax.plot(range(1, len(sigma) + 1), sigma, marker="o", ms=3, color=cmap(k / max(1, len(members) - 1)), label=label)
        ax.set_yscale("log")
        ax.set_title(short_kind(kind), fontsize=10)
        ax.set_xlabel("i")
        ax.set_ylabel("σ_i(ΔW)")
        if len(members) <= 12:
            ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle("Singular values of ΔW = s·BA")
    return _save(fig, path)


def plot_norm_grid(reports: Sequence[ModuleReport], path: str | Path) -> Path:
    """Heatmap over layer (rows) × module kind (columns) of ‖ΔW‖_F / ‖W‖_F, or ‖ΔW‖_F when W is unknown."""
    kinds = _kinds(reports)
    layers = sorted({r.layer for r in reports if r.layer is not None}) + ([None] if any(r.layer is None for r in reports) else [])
    with_weight = all(r.norm_ratio is not None for r in reports)
    values = [[math.nan] * len(kinds) for _ in layers]
    for r in reports:
        values[layers.index(r.layer)][kinds.index(r.kind)] = r.norm_ratio if with_weight else r.delta_norm
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 0.45 * len(layers) + 1.8))
    image = ax.imshow(values, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(kinds)), [short_kind(k) for k in kinds], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers], fontsize=8)
    ax.set_ylabel("layer")
    top = max((v for row in values for v in row if not math.isnan(v)), default=0.0)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                color = "white" if value < 0.6 * top else "black"
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax)
    ax.set_title("‖ΔW‖_F / ‖W‖_F" if with_weight else "‖ΔW‖_F (no base model given)")
    return _save(fig, path)


def plot_similarity(grids: dict[str, Tensor], path: str | Path, labels: tuple[str, str] = ("A₁", "A₂"), max_panels: int = 6) -> Path:
    """φ(A₁, A₂, i, j) heatmaps (i down, j across, 0 to 1) for up to ``max_panels`` modules spread over layers."""
    names = sorted(grids, key=lambda n: (module_layer_and_kind(n)[1], module_layer_and_kind(n)[0] or 0))
    if len(names) > max_panels:
        step = (len(names) - 1) / (max_panels - 1)
        names = [names[round(k * step)] for k in range(max_panels)]
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    image = None
    for ax, name in zip(axes.flat, names):
        grid = grids[name].numpy()
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="Reds", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))  # fmt: skip
        layer, kind = module_layer_and_kind(name)
        ax.set_title(f"{short_kind(kind)}" + (f", layer {layer}" if layer is not None else ""), fontsize=9)
        ax.set_ylabel(f"i ({labels[0]})")
        ax.set_xlabel(f"j ({labels[1]})")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle("Subspace similarity φ(A₁, A₂, i, j)")
    return _save(fig, path, tight=False)


def _save(fig: plt.Figure, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_norm_grid", "plot_similarity", "plot_spectra"]
