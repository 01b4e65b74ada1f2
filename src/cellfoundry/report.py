"""What the pipeline did, for people: tables and figures that `snakemake --report` collects.

- `corpus_tables`: per dataset (cells in and kept, mapping rates) and per species (cells,
  vocabulary size, panel sizes, gene-embedding coverage);
- `training_figure`: training and validation curves from the run's CSV metrics;
- `embedding_report`: for every dataset with cell labels, a 2-D map (UMAP) of the trained
  model's cell embeddings coloured by label, with a kNN label accuracy next to the same
  kNN on a PCA of log-normalised counts (the baseline a foundation model should beat).
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

# obs columns that hold cell labels in the formats people bring (CELLxGENE, loom, scanpy).
LABEL_KEYS = (
    "cell_type",
    "Cell_cluster",
    "celltype",
    "cell_ontology_class",
    "labels",
    "louvain",
    "leiden",
)


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
        "</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
    ]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    for caption, frame in tables.items():
        parts.append(f"<h3>{html.escape(caption)}</h3><table><thead><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in frame.columns]
        parts.append("</tr></thead><tbody>")
        for row in frame.iter_rows():
            cells = []
            for value in row:
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                cells.append(f"<td{' class=n' if numeric else ''}>{html.escape(str(value))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
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


def label_key(obs: pd.DataFrame) -> str | None:
    """The obs column holding cell labels (2 to 200 distinct values), if there is one."""
    for key in LABEL_KEYS:
        if key in obs and 2 <= obs[key].nunique() <= 200:
            return key
    return None


def knn_accuracy(
    X: np.ndarray, labels: np.ndarray, *, k: int = 15, folds: int = 5, seed: int = 0
) -> float:
    """Mean k-nearest-neighbour label accuracy over stratified cross-validation folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    counts = pd.Series(labels).value_counts()
    folds = int(min(folds, counts.min())) if counts.min() >= 2 else 2
    splitter = StratifiedKFold(n_splits=max(folds, 2), shuffle=True, random_state=seed)
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(labels) - len(labels) // folds - 1))
    return float(cross_val_score(classifier, X, labels, cv=splitter).mean())


def pca_baseline(adata: ad.AnnData, n_components: int = 50) -> np.ndarray:
    """PCA of log-normalised counts (scanpy's standard recipe), the embedding to beat."""
    import scanpy as sc

    work = ad.AnnData(X=adata.X.astype(np.float32), obs=adata.obs[[]])
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    n = int(min(n_components, work.n_obs - 1, work.n_vars - 1))
    sc.pp.pca(work, n_comps=n, random_state=0)
    return work.obsm["X_pca"]


def embedding_report(
    h5ads: dict[str, list[Path]],
    species: dict[str, str],
    model_dir: str | Path,
    out_png: str | Path,
    *,
    k: int = 15,
    seed: int = 0,
) -> pl.DataFrame:
    """UMAPs of the model's cell embeddings, coloured by label, and kNN accuracies vs PCA.

    Only datasets with a label column (`LABEL_KEYS`) are shown; the table has one row each.
    """
    import scanpy as sc

    from cellfoundry.inference import embed_cells

    panels = []
    for dataset, paths in sorted(h5ads.items()):
        for path in sorted(paths):
            adata = ad.read_h5ad(path)
            key = label_key(adata.obs)
            if key is None or adata.n_obs < 20:
                continue
            labels = adata.obs[key].astype(str).to_numpy()
            log.info(
                "%s/%s: embedding %d cells labelled by %s", dataset, path.name, adata.n_obs, key
            )
            z = embed_cells(model_dir, adata, species=species[dataset])
            view = ad.AnnData(
                obs=pd.DataFrame({key: pd.Categorical(labels)}, index=adata.obs_names)
            )
            view.obsm["X_model"] = z
            sc.pp.neighbors(view, use_rep="X_model", n_neighbors=k, random_state=seed)
            sc.tl.umap(view, random_state=seed)
            panels.append(
                {
                    "dataset": dataset,
                    "file": path.name,
                    "label_key": key,
                    "n_cells": adata.n_obs,
                    "n_labels": len(set(labels)),
                    "knn_accuracy_model": round(knn_accuracy(z, labels, k=k, seed=seed), 4),
                    "knn_accuracy_pca": round(
                        knn_accuracy(pca_baseline(adata), labels, k=k, seed=seed), 4
                    ),
                    "_umap": view.obsm["X_umap"],
                    "_labels": labels,
                }
            )
    plt = pyplot()
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.8), layout="constrained", squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        categories = sorted(set(panel["_labels"]))
        colours = plt.get_cmap("tab20", max(len(categories), 1))
        for i, category in enumerate(categories):
            chosen = panel["_labels"] == category
            ax.scatter(*panel["_umap"][chosen].T, s=6, color=colours(i), label=category)
        ax.set_title(
            f"{panel['dataset']} ({panel['file']})\nkNN accuracy: model {panel['knn_accuracy_model']:.2f}, "
            f"PCA {panel['knn_accuracy_pca']:.2f}",
            fontsize=10,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2, frameon=False, loc="best")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no dataset with cell labels", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.savefig(out_png, dpi=90, metadata={"Software": None})
    plt.close(fig)
    schema = {
        "dataset": pl.Utf8,
        "file": pl.Utf8,
        "label_key": pl.Utf8,
        "n_cells": pl.Int64,
        "n_labels": pl.Int64,
        "knn_accuracy_model": pl.Float64,
        "knn_accuracy_pca": pl.Float64,
    }
    return pl.DataFrame([{c: p[c] for c in schema} for p in panels], schema=schema)
