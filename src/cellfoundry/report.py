"""What the pipeline did, for people: tables and figures that `snakemake --report` collects.

- `corpus_tables`: per dataset (cells in and kept, mapping rates) and per species (cells,
  vocabulary size, panel sizes, gene-embedding coverage);
- `training_figure`: training and validation curves from the run's CSV metrics;
- `evaluation_figures`: per evaluation dataset, the metrics the training's evaluation
  callback logged (`cellfoundry.train.evaluation`) over steps, with the PCA baseline as a line;
- `embedding_report`: per evaluation dataset, a 2-D map (UMAP) of the trained model's cell
  embeddings of a seeded subsample of its cells, coloured by label, and the metrics of the
  model beside those of a PCA of log-normalised counts (the baseline a foundation model
  should beat).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl

from cellfoundry.io import read_json
from cellfoundry.plots import pyplot

log = logging.getLogger(__name__)

# Metrics of `cellfoundry.metrics.embedding_metrics`, as the report names them.
METRIC_TITLES = {
    "knn_accuracy": "kNN label accuracy",
    "silhouette_label": "label silhouette",
    "silhouette_batch": "batch silhouette (within labels)",
    "graph_connectivity": "graph connectivity",
    "ilisi": "iLISI (batch mixing)",
}


def corpus_tables(
    qc_files: list[Path],
    token_mappings: list[Path],
    panel_reports: list[Path],
    embedding_reports: list[Path],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(datasets table, species table) from the QC records and reference outputs."""
    rows = []
    for path in sorted(qc_files):
        qc = read_json(path)
        files = qc["files"]
        rows.append(
            {
                "dataset": qc["dataset"],
                "species": qc["species"],
                "files": len(files),
                "cells_in": qc["cells_in"],
                "cells_kept": qc["cells_kept"],
                "kept_fraction": round(qc["cells_kept"] / max(qc["cells_in"], 1), 4),
                "genes_in": sum(f["genes_in"] for f in files),
                "genes_mapped": sum(f["genes_mapped"] for f in files),
                "mapping_rate": qc["mapping_rate"],
                "mapped_counts_fraction": round(
                    float(np.mean([f["mapped_counts_fraction"] for f in files])), 4
                ),
                "counts_from": ", ".join(sorted({f["counts_source"] for f in files})),
            }
        )
    datasets = pl.DataFrame(rows).sort("dataset")
    species_rows = []
    for path in sorted(token_mappings):
        species = path.stem
        mapping = pl.read_csv(path)
        panels = sorted(
            (p for p in panel_reports if p.parent.name == species), key=lambda p: p.stem
        )
        embeddings = [read_json(p) for p in sorted(embedding_reports) if p.stem == species]
        of_species = datasets.filter(pl.col("species") == species)
        species_rows.append(
            {
                "species": species,
                "datasets": of_species.height,
                "cells": int(of_species["cells_kept"].sum()),
                "vocabulary_genes": int((~mapping["gene_id"].str.starts_with("<")).sum()),
                "panels": ", ".join(f"{p.stem} ({read_json(p)['n_genes']} genes)" for p in panels),
                "gene_embeddings": ", ".join(
                    f"{e['name']} ({e['n_embedded']} embedded, {e['n_fallback']} fallback)"
                    for e in embeddings
                ),
            }
        )
    return datasets, pl.DataFrame(species_rows)


def html_tables(title: str, tables: dict[str, pl.DataFrame], *, note: str = "") -> str:
    """A small self-contained HTML page of titled tables (the report shows it inline)."""
    import html

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1rem;color:#222}",
        "table{border-collapse:collapse;margin:0 0 1.5rem 0;font-size:13px}",
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}",
        "th{background:#eef4fb}td.n{text-align:right}",
        # Wide tables scroll inside the pane instead of overflowing it.
        ".wrap{max-width:100%;overflow-x:auto;margin:0 0 1.5rem 0}.wrap table{margin:0}",
        "</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
    ]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    for caption, frame in tables.items():
        parts.append(f"<h3>{html.escape(caption)}</h3><div class='wrap'><table><thead><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in frame.columns]
        parts.append("</tr></thead><tbody>")
        for row in frame.iter_rows():
            cells = []
            for value in row:
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                cells.append(f"<td{' class=n' if numeric else ''}>{html.escape(str(value))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def training_figure(metrics_csv: str | Path, out: str | Path, *, title: str) -> dict[str, Any]:
    """Loss, accuracy and learning-rate curves of a run; returns a summary of the curves."""
    metrics = pl.read_csv(metrics_csv)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    summary: dict[str, Any] = {}
    for ax, metric in zip(axes[:2], ("loss", "accuracy"), strict=True):
        for stage, colour in (("train", "#3b7dd8"), ("val", "#d8513b")):
            column = f"{stage}/{metric}"
            if column not in metrics.columns:
                continue
            points = (
                metrics.filter(pl.col(column).is_not_null()).select("step", column).sort("step")
            )
            if points.height:
                ax.plot(
                    points["step"],
                    points[column],
                    marker="o" if stage == "val" else None,
                    color=colour,
                    label=stage,
                )
                summary[f"{stage}_{metric}_first"] = float(points[column][0])
                summary[f"{stage}_{metric}_last"] = float(points[column][-1])
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(frameon=False)
    lr_columns = [c for c in metrics.columns if c.startswith("lr-")]
    if lr_columns:
        points = (
            metrics.filter(pl.col(lr_columns[0]).is_not_null())
            .select("step", lr_columns[0])
            .sort("step")
        )
        axes[2].plot(points["step"], points[lr_columns[0]], color="#555555")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("learning rate")
    fig.suptitle(title)
    fig.savefig(out, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return summary


def evaluation_figures(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """One figure per evaluation dataset: each `eval/<dataset>/<metric>` over steps, with its
    PCA baseline (`<metric>_pca`) as a dashed line. Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = pl.read_csv(metrics_csv, infer_schema_length=None)
    names = sorted(
        {
            c.split("/")[1]
            for c in metrics.columns
            if c.startswith("eval/") and c.count("/") == 2 and not c.endswith("_pca")
        }
    )
    plt = pyplot()
    written = []
    for name in names:
        present = [m for m in METRIC_TITLES if f"eval/{name}/{m}" in metrics.columns]
        columns = min(len(present), 3)
        rows = -(-len(present) // columns)
        fig, axes = plt.subplots(
            rows, columns, figsize=(3.6 * columns, 3.0 * rows + 0.6), layout="constrained",
            squeeze=False,
        )  # fmt: skip
        for ax, metric in zip(axes.ravel(), present, strict=False):
            column = f"eval/{name}/{metric}"
            points = (
                metrics.filter(pl.col(column).is_not_null()).select("step", column).sort("step")
            )
            ax.plot(points["step"], points[column], marker="o", color="#3b7dd8", label="model")
            baseline = (
                metrics[f"{column}_pca"].drop_nulls()
                if f"{column}_pca" in metrics.columns
                else None
            )
            if baseline is not None and baseline.len():
                ax.axhline(
                    float(baseline[-1]), color="#d8513b", linestyle="--", label="PCA baseline"
                )
            ax.set_title(METRIC_TITLES[metric], fontsize=11)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(present) :]:
            ax.set_axis_off()
        axes.ravel()[0].legend(frameon=False, fontsize=9, loc="lower right")
        fig.suptitle(f"{name}: cell-embedding metrics during training", fontsize=12)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def embedding_report(
    settings: dict[str, Any],
    manifest: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
) -> pl.DataFrame:
    """Per evaluation dataset (the `eval` settings, resolved on the shard manifest as during
    training), a UMAP of the model's embeddings of the same seeded subsample of cells,
    coloured by label, written to `<out_dir>/<dataset>.png`; returns one row of metrics per
    dataset, the model's and the PCA baseline's (`<metric>_pca`)."""
    import scanpy as sc

    from cellfoundry.inference import embed_with, open_model
    from cellfoundry.metrics import embedding_metrics, pca_baseline
    from cellfoundry.seeds import derive_seed
    from cellfoundry.train.evaluation import resolve, sample_cells

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = open_model(model_dir)
    rows = []
    k = settings["k"]
    for spec in resolve(settings, manifest):
        adata = sample_cells(spec, settings["n_cells"], seed=seed)
        labels = adata.obs["label"].to_numpy()
        batches = adata.obs["batch"].to_numpy() if "batch" in adata.obs else None
        log.info("%s: embedding %d cells labelled by %s", spec.name, adata.n_obs, spec.label_key)
        z = embed_with(loaded, adata, species=spec.species)
        local = derive_seed(seed, "eval", spec.name) % 2**32
        model = embedding_metrics(z, labels, batches, k=k, seed=local)
        baseline = embedding_metrics(
            pca_baseline(
                adata,
                n_top_genes=settings["baseline"]["n_top_genes"],
                n_components=settings["baseline"]["n_components"],
                seed=local,
            ),
            labels,
            batches,
            k=k,
            seed=local,
        )
        view = ad.AnnData(
            obs=pd.DataFrame({"label": pd.Categorical(labels)}, index=adata.obs_names)
        )
        view.obsm["X_model"] = z
        sc.pp.neighbors(view, use_rep="X_model", n_neighbors=k, random_state=seed)
        sc.tl.umap(view, random_state=seed)
        _umap_figure(
            view.obsm["X_umap"],
            labels,
            out_dir / f"{spec.name}.png",
            title=(
                f"{spec.name}: {adata.n_obs} cells by {spec.label_key}\n"
                f"kNN accuracy: model {model['knn_accuracy']:.2f}, PCA {baseline['knn_accuracy']:.2f}"
            ),
        )
        row: dict[str, Any] = {
            "dataset": spec.name,
            "label_key": spec.label_key,
            "batch_key": spec.batch_key or "",
            "n_cells": adata.n_obs,
            "n_labels": len(set(labels)),
        }
        for metric in METRIC_TITLES:
            row[metric] = round(model[metric], 4) if metric in model else None
            row[f"{metric}_pca"] = round(baseline[metric], 4) if metric in baseline else None
        rows.append(row)
    schema = {
        "dataset": pl.Utf8,
        "label_key": pl.Utf8,
        "batch_key": pl.Utf8,
        "n_cells": pl.Int64,
        "n_labels": pl.Int64,
        **{f"{m}{suffix}": pl.Float64 for m in METRIC_TITLES for suffix in ("", "_pca")},
    }
    return pl.DataFrame(rows, schema=schema)


def _umap_figure(umap: np.ndarray, labels: np.ndarray, path: Path, *, title: str) -> None:
    """A UMAP coloured by label, the legend beside it (one column per 16 labels)."""
    plt = pyplot()
    categories = sorted(set(labels))
    colours = plt.get_cmap("tab20", max(len(categories), 1))
    columns = -(-len(categories) // 16)
    fig, ax = plt.subplots(figsize=(6.0 + 1.8 * columns, 5.0), layout="constrained")
    for i, category in enumerate(categories):
        chosen = labels == category
        ax.scatter(*umap[chosen].T, s=8, color=colours(i), label=category, linewidths=0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        fontsize=9, markerscale=2, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5),
        ncols=columns,
    )  # fmt: skip
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
