"""Figures the pipeline writes (QC per dataset; more for the report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed metadata so that the same data gives the same PNG bytes.
    plt.rcParams["svg.hashsalt"] = "cellfoundry"
    return plt


def plot_qc(
    dataset: str,
    metrics: list[pd.DataFrame],
    settings: Any,
    path: str | Path,
    *,
    warnings: list[str] | None = None,
) -> None:
    """Histograms of total counts, detected genes and mitochondrial fraction, with thresholds.

    `metrics` holds one table per file with columns total_counts, n_genes_by_counts,
    mito_fraction and kept; `warnings` are printed under the title (e.g. no mitochondrial gene).
    """
    plt = pyplot()
    table = pd.concat(metrics, ignore_index=True)
    kept = table["kept"].to_numpy()
    panels = [
        ("total_counts", "total counts per cell", [settings.min_counts, settings.max_counts], True),
        (
            "n_genes_by_counts",
            "genes detected per cell",
            [settings.min_genes, settings.max_genes],
            True,
        ),
        ("mito_fraction", "mitochondrial fraction", [settings.max_mito_fraction], False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), layout="constrained")
    for ax, (column, label, thresholds, log_scale) in zip(axes, panels, strict=False):
        values = table[column].to_numpy(dtype=float)
        if log_scale:
            values = np.log10(values + 1)
            label = f"log10(1 + {label})"
        bins = np.histogram_bin_edges(values, bins=50)
        ax.hist(values[kept], bins=bins, color="#3b7dd8", label="kept")
        ax.hist(values[~kept], bins=bins, color="#d8513b", alpha=0.8, label="removed")
        for threshold in thresholds:
            if threshold is None:
                continue
            x = np.log10(threshold + 1) if log_scale else threshold
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
    axes[0].legend(frameon=False)
    ax = axes[3]
    ax.bar(["in", "kept"], [len(table), int(kept.sum())], color=["#999999", "#3b7dd8"])
    ax.set_title(f"{int(kept.sum())} of {len(table)} cells kept")
    title = (
        f"{dataset}: min_genes={settings.min_genes}, min_counts={settings.min_counts}, "
        f"max_mito_fraction={settings.max_mito_fraction}"
    )
    if warnings:
        title += "\n" + "\n".join(f"warning: {w}" for w in warnings)
        axes[2].text(
            0.5,
            0.5,
            "no mitochondrial genes" if any("mitochondrial" in w for w in warnings) else "",
            transform=axes[2].transAxes,
            ha="center",
            color="#d8513b",
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
