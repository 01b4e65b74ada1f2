"""How well cell embeddings carry labels and mix batches: scIB's metrics, and a PCA baseline.

Definitions follow scIB (Luecken et al. 2022, Nat Methods) as implemented in `scib-metrics`
0.5 (scverse): `silhouette_label`, `silhouette_batch`, `graph_connectivity` and `ilisi_knn`
compute the same quantities with scikit-learn, scipy and numpy instead of JAX (README,
design notes: scib-metrics brings jax and jaxlib, 380 MB, into the training process and
compiles each metric on first use, ~15 s on two cores, for a few thousand cells at most).
`knn_accuracy` is the cross-validated k-nearest-neighbour label accuracy used by zero-shot
evaluations of single-cell foundation models (Kedzierska et al. 2025, Genome Biol).

Every function takes an embedding `X` [n_cells, dims] and per-cell arrays [n_cells]; all
scores lie in [0, 1] and higher is better.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


# Repeats of the k-fold split behind `knn_accuracy` (README, "How noisy is the ruler").
KNN_REPEATS = 10


def knn_accuracy(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = 15,
    folds: int = 5,
    repeats: int = KNN_REPEATS,
    seed: int = 0,
) -> float:
    """Mean k-nearest-neighbour label accuracy over `repeats` x `folds` stratified
    cross-validation folds (scikit-learn's `RepeatedStratifiedKFold`, seeded).

    One 5-fold split of a few hundred cells is a noisy ruler: on the 298-cell loom of
    ../shared/data one PCA baseline scores 0.614-0.654 over 30 fold seeds (sd 0.011); the
    mean over 10 repeats moves by sd 0.003 (README, "How noisy is the ruler"). Labels with
    fewer cells than folds are kept (they can only be predicted wrong in some folds); the
    number of folds drops to the smallest label's size, and to 2 at least.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    counts = pd.Series(labels).value_counts()
    folds = max(2, min(folds, int(counts.min())))
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(labels) - len(labels) // folds - 1))
    with warnings.catch_warnings():  # "the least populated class has only 1 member"
        warnings.simplefilter("ignore", UserWarning)
        return float(cross_val_score(classifier, X, labels, cv=splitter).mean())


def silhouette_label(X: np.ndarray, labels: np.ndarray) -> float:
    """Average silhouette width of the labels, rescaled to [0, 1] ((ASW + 1) / 2)."""
    from sklearn.metrics import silhouette_score

    return float((silhouette_score(X, labels) + 1) / 2)


def silhouette_batch(X: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """Batch mixing within labels: per label, the mean of 1 - |silhouette of the batches|
    over its cells, averaged over labels (labels within one batch, or one cell per batch,
    are skipped). 1 = batches indistinguishable within every label."""
    from sklearn.metrics import silhouette_samples

    scores = []
    for label in np.unique(labels):
        chosen = labels == label
        n_batches = len(np.unique(batches[chosen]))
        if n_batches == 1 or n_batches == int(chosen.sum()):
            continue
        scores.append(float(np.mean(1 - np.abs(silhouette_samples(X[chosen], batches[chosen])))))
    return float(np.mean(scores)) if scores else float("nan")


def neighbors(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) [n_cells, k + 1] of each cell's k nearest neighbours, itself first
    (exact, Euclidean)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k + 1, len(X))
    distances, indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return distances, indices


def graph_connectivity(indices: np.ndarray, distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of the share of the label's cells in the largest connected component
    of the kNN graph restricted to that label (strong connectivity of the directed graph)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n, k = indices.shape
    graph = sp.csr_matrix(
        (distances.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n)
    )
    shares = []
    for label in np.unique(labels):
        chosen = labels == label
        _, components = connected_components(graph[chosen][:, chosen], connection="strong")
        sizes = np.bincount(components)
        shares.append(sizes.max() / sizes.sum())
    return float(np.mean(shares))


def lisi(
    indices: np.ndarray,
    distances: np.ndarray,
    categories: np.ndarray,
    *,
    perplexity: float | None = None,
    tol: float = 1e-5,
) -> np.ndarray:
    """Local inverse Simpson index of each cell [n_cells] (Korsunsky et al. 2019, Harmony).

    Each cell's neighbours (itself excluded) get Gaussian weights exp(-d beta), beta found by
    bisection (at most 50 steps) so that the weights' entropy is log(perplexity); LISI is
    1 / sum over categories of the squared weight per category. A cell whose weights vanish
    gets -1, as in scib-metrics. Default perplexity: neighbours // 3.
    """
    codes = pd.Categorical(categories).codes
    n_categories = int(codes.max()) + 1
    perplexity = float(np.floor(indices.shape[1] / 3)) if perplexity is None else perplexity
    keep = indices != np.arange(len(indices))[:, None]
    d = distances.astype(np.float64)

    def h_beta(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = np.where(keep, np.exp(-d * beta[:, None]), 0.0)
        total = P.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            H = np.where(total == 0, 0.0, np.log(total) + beta * (d * P).sum(1) / total)
            P = np.where(total[:, None] == 0, 0.0, P / total[:, None])
        return H, P

    n = len(indices)
    beta = np.ones(n)
    low, high = np.full(n, -np.inf), np.full(n, np.inf)
    H, P = h_beta(beta)
    diff = H - np.log(perplexity)
    for _ in range(50):
        active = np.abs(diff) >= tol
        if not active.any():
            break
        up = diff > 0
        new_low = np.where(up, beta, low)
        new_high = np.where(up, high, beta)
        new_beta = np.where(
            up,
            np.where(high == np.inf, beta * 2, (beta + high) / 2),
            np.where(low == -np.inf, beta / 2, (beta + low) / 2),
        )
        new_H, new_P = h_beta(new_beta)
        # Rows that have converged keep their state (each row stops on its own).
        beta = np.where(active, new_beta, beta)
        low, high = np.where(active, new_low, low), np.where(active, new_high, high)
        H = np.where(active, new_H, H)
        P = np.where(active[:, None], new_P, P)
        diff = H - np.log(perplexity)
    rows = np.repeat(np.arange(n), indices.shape[1])
    per_category = np.zeros((n, n_categories))
    np.add.at(per_category, (rows, codes[indices].ravel()), P.ravel())
    simpson = np.where(H == 0, -1.0, (per_category**2).sum(1))
    return 1 / simpson


def ilisi(indices: np.ndarray, distances: np.ndarray, batches: np.ndarray) -> float:
    """Integration LISI, scaled: (median LISI of batches - 1) / (batches - 1); 1 = every
    cell's neighbourhood holds all batches in equal shares."""
    n_batches = len(np.unique(batches))
    return float((np.nanmedian(lisi(indices, distances, batches)) - 1) / (n_batches - 1))


def embedding_metrics(
    X: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray | None = None,
    *,
    k: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """The label metrics of an embedding, and the batch metrics when batches are given.

    Returns `knn_accuracy`, `silhouette_label` and, with two or more batches,
    `silhouette_batch`, `graph_connectivity` (kNN graph of `k` neighbours) and `ilisi`
    (90 neighbours, perplexity 30, as scIB's benchmark uses).
    """
    X = np.asarray(X, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    out = {
        "knn_accuracy": knn_accuracy(X, labels, k=k, seed=seed),
        "silhouette_label": silhouette_label(X, labels),
    }
    if batches is not None and len(np.unique(batches)) > 1:
        batches = np.asarray(batches).astype(str)
        distances, indices = neighbors(X, max(k, 90))
        out["silhouette_batch"] = silhouette_batch(X, labels, batches)
        out["graph_connectivity"] = graph_connectivity(
            indices[:, : k + 1], distances[:, : k + 1], labels
        )
        out["ilisi"] = ilisi(indices, distances, batches)
    return out


def pca_baseline(
    adata: ad.AnnData, *, n_top_genes: int = 2000, n_components: int = 50, seed: int = 0
) -> np.ndarray:
    """PCA of the highly variable genes of log-normalised counts [n_cells, n_components].

    scanpy's standard recipe: counts per cell scaled to 10,000, log1p, the `n_top_genes` most
    variable genes (Seurat's dispersion flavour), PCA. `adata.X` holds raw counts.
    """
    import scanpy as sc

    work = ad.AnnData(X=adata.X.astype(np.float32), var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    expressed = np.asarray((work.X != 0).sum(0)).ravel() > 0
    work = work[:, expressed].copy()
    if work.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, subset=True)
    n = int(min(n_components, work.n_obs - 1, work.n_vars - 1))
    sc.pp.pca(work, n_comps=n, random_state=seed)
    return np.asarray(work.obsm["X_pca"])
