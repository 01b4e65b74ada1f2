"""The demo corpus: a small, SIMULATED single-cell corpus the default configuration runs on.

Every count in these files is SIMULATED. No cell was ever sequenced: the files exist so that the
pipeline can run end to end offline, on a fresh machine, in a minute or two, and so that tests
have data with a known structure. Never use them to draw biological conclusions.

What is real is everything a pipeline trips over:

- Genes are real Ensembl IDs and symbols of the bundled GENCODE references (v48 human, M37
  mouse): a seeded draw from each species' protein-coding genes, shared between the datasets
  of a species with partial overlap, plus all mitochondrial genes (``MT-*`` / ``mt-*``) and a
  few real marker genes per cell type (CD3E, LYZ, Gfap, Rho, ...).
- The storage layouts are those real data arrive in (see `DEMO_DATASETS`): h5ad with raw
  counts in a sparse X, in a dense layer or in ``raw.X`` under a normalized X; Ensembl IDs or
  symbols only; symbols that no longer map (about 3%), symbols that GENCODE gives to two genes
  (made unique the anndata way, ``SYMBOL-1``); a folder of loom files; a Cell Ranger HDF5 with
  antibody-capture features a reader must drop.
- Expression has structure a model can learn: per species a set of cell-type programs
  (log-fold changes on marker genes) shared by all datasets of that species, log-normal library
  sizes, gamma-Poisson (negative binomial) counts, per-dataset and per-batch gene-wise shifts,
  and in every dataset about 2% of cells that any usual QC removes (tiny libraries, ambient-like
  droplets with few genes, or a high mitochondrial fraction).

Everything derives from one seed (`derive_seed(seed, "demo", ...)`), and the files are
byte-identical on repeated runs with the same seed and the same library versions (HDF5 object
timestamps are off; gzip is deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from cellfoundry.io import atomic_outputs
from cellfoundry.reference import NCBI_TAXON, load_bundled, symbol_index
from cellfoundry.seeds import derive_seed


@dataclass(frozen=True)
class DemoDataset:
    """One dataset of the demo corpus.

    Attributes
    ----------
    name
        Dataset name, as in the dataset sheet.
    species
        Ensembl-style species name.
    path
        Where the dataset lies, relative to the corpus folder: a file, or a folder of files.
    description
        How the dataset is stored, in one line.
    n_cells
        Cells written by default (over all files of a folder).
    """

    name: str
    species: str
    path: str
    description: str
    n_cells: int


DEMO_DATASETS: tuple[DemoDataset, ...] = (
    DemoDataset(
        "demo_pbmc_ids",
        "hsapiens",
        "demo_pbmc_ids.h5ad",
        "SIMULATED PBMC; h5ad, CSR int32 raw counts in X, Ensembl IDs, var.gene_name, "
        "obs.cell_type",
        600,
    ),
    DemoDataset(
        "demo_pbmc_symbols",
        "hsapiens",
        "demo_pbmc_symbols.h5ad",
        "SIMULATED PBMC; h5ad, dense log1p-normalized X, dense raw counts in "
        "layers['counts'], gene symbols only (made unique; raw ones in var.gene_symbols)",
        500,
    ),
    DemoDataset(
        "demo_pbmc_10x",
        "hsapiens",
        "demo_pbmc_10x.h5",
        "SIMULATED PBMC; Cell Ranger 6 feature-barcode HDF5 with antibody-capture features, "
        "no labels",
        500,
    ),
    DemoDataset(
        "demo_brain",
        "mmusculus",
        "demo_brain.h5ad",
        "SIMULATED mouse brain; CELLxGENE-style h5ad, log-normalized X, raw counts in raw.X, "
        "Ensembl IDs",
        700,
    ),
    DemoDataset(
        "demo_retina",
        "mmusculus",
        "demo_retina",
        "SIMULATED mouse retina; folder of two loom files (two batches), gene symbols, "
        "col_attrs/Cell_cluster",
        600,
    ),
)

# The files of the folder dataset, one per batch.
RETINA_FILES = ("retina_batch1.loom", "retina_batch2.loom")
# Fewer cells than this cannot hold every cell type and the QC-failing cells.
MIN_CELLS = 40


@dataclass(frozen=True)
class _Program:
    """A cell-type expression program: real marker genes plus seeded random ones."""

    name: str
    markers: tuple[str, ...]
    size_shift: float  # log library-size offset; platelets are small, neurons large


PROGRAMS: dict[str, tuple[_Program, ...]] = {
    "hsapiens": (
        _Program("CD4 T", ("IL7R", "CCR7", "LEF1", "TCF7", "MAL", "CD3E", "CD3D"), 0.0),
        _Program("CD8 T", ("CD8A", "CD8B", "GZMK", "CD3E", "CD3D"), 0.0),
        _Program("NK", ("NKG7", "GNLY", "KLRD1", "KLRF1", "PRF1"), 0.1),
        _Program("B", ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1"), 0.0),
        _Program("CD14 Mono", ("CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN"), 0.3),
        _Program("FCGR3A Mono", ("FCGR3A", "MS4A7", "LST1", "CDKN1C"), 0.3),
        _Program("DC", ("FCER1A", "CLEC10A", "CD1C", "CST3"), 0.2),
        _Program("Platelet", ("PPBP", "PF4", "GP9", "ITGA2B", "TUBB1"), -0.6),
    ),
    "mmusculus": (
        _Program("astrocyte", ("Gfap", "Aqp4", "Aldh1l1", "Slc1a3", "Gja1"), 0.0),
        _Program("oligodendrocyte", ("Mbp", "Plp1", "Mog", "Mobp", "Cldn11"), 0.1),
        _Program("microglia", ("Cx3cr1", "P2ry12", "Tmem119", "Csf1r", "C1qa"), -0.1),
        _Program("endothelial", ("Cldn5", "Pecam1", "Flt1", "Kdr", "Esam"), -0.2),
        _Program("glutamatergic", ("Slc17a7", "Neurod6", "Satb2", "Tbr1", "Slc17a6"), 0.4),
        _Program("GABAergic", ("Gad1", "Gad2", "Slc32a1", "Sst", "Pvalb"), 0.3),
        _Program("rod", ("Rho", "Gnat1", "Nrl", "Pde6b", "Sag"), -0.2),
        _Program("muller", ("Rlbp1", "Glul", "Clu", "Dkk3", "Car2"), 0.0),
    ),
}

# Symbols GENCODE gives to two protein-coding genes (pseudoautosomal and similar); both
# genes enter the corpus so symbol-only files carry a real duplicated symbol.
DUPLICATED_SYMBOLS = {"hsapiens": "SLC25A6", "mmusculus": "Tsc22d4"}
MITO_PREFIX = {"hsapiens": "MT-", "mmusculus": "mt-"}
# Clone-based names of old annotations (RP11-..., RP23-...) that current GENCODE no longer
# has; they stand for the few percent of symbols in real files that map to nothing.
RETIRED_PREFIX = {"hsapiens": "RP11-", "mmusculus": "RP23-"}

POOL_SIZE = 2400  # protein-coding genes per species; each dataset draws a subset
RANDOM_MARKERS = 40  # seeded marker genes per program, besides the named ones


@dataclass(frozen=True)
class _Recipe:
    """How one dataset is simulated."""

    types: tuple[tuple[str, str, float], ...]  # (program, label in the file, fraction)
    n_genes: int  # protein-coding genes drawn from the species pool, named markers included
    median_umis: float
    mito_mean: float  # mean mitochondrial fraction of healthy cells
    unmapped_fraction: float  # share of extra genes with symbols that map to nothing


_PBMC_TYPES = (
    ("CD4 T", "CD4 T", 0.30),
    ("CD14 Mono", "CD14 Mono", 0.20),
    ("CD8 T", "CD8 T", 0.14),
    ("B", "B", 0.12),
    ("NK", "NK", 0.10),
    ("FCGR3A Mono", "FCGR3A Mono", 0.06),
    ("DC", "DC", 0.05),
    ("Platelet", "Platelet", 0.03),
)
_RECIPES: dict[str, _Recipe] = {
    "demo_pbmc_ids": _Recipe(_PBMC_TYPES, 1750, 3000.0, 0.04, 0.0),
    "demo_pbmc_symbols": _Recipe(_PBMC_TYPES, 1700, 2500.0, 0.05, 0.03),
    "demo_pbmc_10x": _Recipe(_PBMC_TYPES, 1800, 3500.0, 0.05, 0.0),
    "demo_brain": _Recipe(
        (
            ("glutamatergic", "glutamatergic neuron", 0.30),
            ("oligodendrocyte", "oligodendrocyte", 0.20),
            ("GABAergic", "GABAergic neuron", 0.15),
            ("astrocyte", "astrocyte", 0.15),
            ("microglia", "microglial cell", 0.12),
            ("endothelial", "endothelial cell", 0.08),
        ),
        1800,
        4000.0,
        0.03,
        0.0,
    ),
    "demo_retina": _Recipe(
        (
            ("rod", "Rod", 0.45),
            ("glutamatergic", "Bipolar", 0.15),
            ("muller", "Muller", 0.15),
            ("GABAergic", "Amacrine", 0.12),
            ("microglia", "Microglia", 0.07),
            ("endothelial", "Endothelial", 0.06),
        ),
        1600,
        2000.0,
        0.04,
        0.04,
    ),
}

# CELLxGENE cell-type terms of the brain labels.
_BRAIN_ONTOLOGY = {
    "glutamatergic neuron": "CL:0000679",
    "GABAergic neuron": "CL:0000617",
    "oligodendrocyte": "CL:0000128",
    "astrocyte": "CL:0000127",
    "microglial cell": "CL:0000129",
    "endothelial cell": "CL:0000115",
}
# TotalSeq antibodies of the 10x file, and the labels that carry each protein.
_ANTIBODIES = (
    ("CD3", ("CD4 T", "CD8 T")),
    ("CD4", ("CD4 T", "CD14 Mono", "FCGR3A Mono", "DC")),
    ("CD8", ("CD8 T",)),
    ("CD14", ("CD14 Mono",)),
    ("CD16", ("NK", "FCGR3A Mono")),
    ("CD19", ("B",)),
    ("CD56", ("NK",)),
)


@dataclass(frozen=True)
class _SpeciesModel:
    """Genes and programs of one species, shared by all its datasets."""

    species: str
    gene_ids: np.ndarray  # protein-coding pool, sorted by gene_id
    gene_names: np.ndarray
    required: np.ndarray  # named markers and the duplicated-symbol genes: in every dataset
    baseline: np.ndarray  # log relative expression
    dispersion: np.ndarray  # gamma-Poisson overdispersion (variance = mu + phi mu^2)
    programs: dict[str, np.ndarray]  # program name -> log-fold change over the pool
    size_shift: dict[str, float]
    mito_ids: np.ndarray
    mito_names: np.ndarray
    mito_weights: np.ndarray  # share of each mitochondrial gene in the mitochondrial counts
    retired: np.ndarray  # symbols that map to no gene of the reference


@dataclass(frozen=True)
class _Panel:
    """The genes of one dataset, in file order."""

    gene_ids: np.ndarray  # "" for retired symbols
    gene_names: np.ndarray
    is_mito: np.ndarray
    mito_share: np.ndarray  # share of the mitochondrial counts; 0 for nuclear genes
    baseline: np.ndarray  # log relative expression, dataset batch shift included
    dispersion: np.ndarray
    lfc: dict[str, np.ndarray]  # program -> log-fold change over the panel


@dataclass(frozen=True)
class _Cells:
    """Simulated cells of one file."""

    counts: np.ndarray  # cells x genes, int64
    labels: np.ndarray
    barcodes: np.ndarray  # 16-mers without the 10x "-1" suffix


def write_demo_corpus(out_dir: Path, *, seed: int = 0, n_cells: int | None = None) -> list[Path]:
    """Write the SIMULATED demo corpus; all datasets appear together or none does.

    Parameters
    ----------
    out_dir
        Corpus folder; each dataset goes to ``out_dir / dataset.path``.
    seed
        Global seed; every dataset derives its own from it and its name.
    n_cells
        Cells per dataset (a folder dataset splits them over its files) instead of each
        dataset's default; at least `MIN_CELLS`.

    Returns
    -------
    The written paths (files, and the folder of the loom dataset), in `DEMO_DATASETS` order.
    """
    if n_cells is not None and n_cells < MIN_CELLS:
        raise ValueError(f"n_cells must be at least {MIN_CELLS}, got {n_cells}")
    out_dir = Path(out_dir)
    models = {s: _species_model(s, seed) for s in sorted({d.species for d in DEMO_DATASETS})}
    finals = [out_dir / dataset.path for dataset in DEMO_DATASETS]
    with atomic_outputs(*finals) as temps:
        for dataset, temp in zip(DEMO_DATASETS, temps, strict=True):
            cells = n_cells if n_cells is not None else dataset.n_cells
            _WRITERS[dataset.name](temp, models[dataset.species], seed, cells)
    return finals


def demo_files(out_dir: str | Path) -> list[Path]:
    """Every file `write_demo_corpus` writes to `out_dir` (a folder dataset's files listed),
    known before they exist so the workflow can plan a job per file."""
    out_dir = Path(out_dir)
    files = []
    for dataset in DEMO_DATASETS:
        if dataset.name == "demo_retina":
            files += [out_dir / dataset.path / name for name in RETINA_FILES]
        else:
            files.append(out_dir / dataset.path)
    return files


def demo_dataset_sheet(out_dir: Path) -> pl.DataFrame:
    """The dataset sheet of the demo corpus written to `out_dir`.

    Parameters
    ----------
    out_dir
        Corpus folder as the sheet should name it (kept relative when given relative).

    Returns
    -------
    Columns ``dataset``, ``species`` and ``path``, one row per dataset.
    """
    return pl.DataFrame(
        {
            "dataset": [d.name for d in DEMO_DATASETS],
            "species": [d.species for d in DEMO_DATASETS],
            "path": [(Path(out_dir) / d.path).as_posix() for d in DEMO_DATASETS],
        }
    )


# ---------------------------------------------------------------------------------------------
# Simulation


def _species_model(species: str, seed: int) -> _SpeciesModel:
    rng = np.random.default_rng(derive_seed(seed, "demo", species))
    reference = load_bundled(species)
    table = reference.table
    prefix = MITO_PREFIX[species]
    mito = table.filter(pl.col("gene_name").str.starts_with(prefix)).sort("gene_name")
    name_counts = table.group_by("gene_name").len()
    # Protein-coding genes whose symbol is their own, so symbol-only files map cleanly.
    eligible = (
        table.join(name_counts, on="gene_name")
        .filter(
            (pl.col("gene_type") == "protein_coding")
            & (pl.col("len") == 1)
            & ~pl.col("gene_name").str.starts_with(prefix)
            & ~pl.col("gene_name").str.starts_with("ENS")
        )
        .sort("gene_id")
    )
    by_name = dict(zip(eligible["gene_name"].to_list(), eligible["gene_id"].to_list(), strict=True))
    named = {m for p in PROGRAMS[species] for m in p.markers if m in by_name}
    duplicated = table.filter(
        (pl.col("gene_name") == DUPLICATED_SYMBOLS[species])
        & (pl.col("gene_type") == "protein_coding")
    )
    required_ids = sorted({by_name[m] for m in named} | set(duplicated["gene_id"].to_list()))
    others = np.array(sorted(set(by_name.values()) - set(required_ids)))
    drawn = rng.choice(others, size=POOL_SIZE - len(required_ids), replace=False)
    pool = table.filter(pl.col("gene_id").is_in(np.concatenate([drawn, required_ids]).tolist()))
    gene_ids = pool["gene_id"].to_numpy().astype(str)
    gene_names = pool["gene_name"].to_numpy().astype(str)
    required = np.isin(gene_ids, required_ids)
    is_named = np.isin(gene_names, sorted(named))

    # Heavy-tailed gene abundances make the matrix about as sparse as real droplet data.
    baseline = rng.normal(0.0, 2.0, size=gene_ids.size)
    # Named markers are low elsewhere so that they are specific.
    baseline[is_named] = rng.normal(-2.0, 0.5, size=int(is_named.sum()))
    dispersion = np.exp(rng.normal(np.log(0.2), 0.4, size=gene_ids.size))
    candidates = np.flatnonzero(~is_named)
    programs: dict[str, np.ndarray] = {}
    for program in PROGRAMS[species]:
        lfc = np.zeros(gene_ids.size)
        chosen = rng.choice(candidates, size=RANDOM_MARKERS, replace=False)
        lfc[chosen] = rng.uniform(1.0, 2.5, size=RANDOM_MARKERS)
        markers = np.flatnonzero(np.isin(gene_names, program.markers))
        lfc[markers] = rng.uniform(2.5, 4.0, size=markers.size)
        programs[program.name] = lfc

    mito_types = mito["gene_type"].to_numpy()
    # tRNAs are barely captured by poly-A protocols; rRNAs and protein-coding genes dominate.
    mito_weights = np.where(
        mito_types == "Mt_tRNA", 0.005, np.where(mito_types == "Mt_rRNA", 0.5, 1.0)
    ) * np.exp(rng.normal(0.0, 0.5, size=mito.height))
    return _SpeciesModel(
        species=species,
        gene_ids=gene_ids,
        gene_names=gene_names,
        required=required,
        baseline=baseline,
        dispersion=dispersion,
        programs=programs,
        size_shift={p.name: p.size_shift for p in PROGRAMS[species]},
        mito_ids=mito["gene_id"].to_numpy().astype(str),
        mito_names=mito["gene_name"].to_numpy().astype(str),
        mito_weights=mito_weights / mito_weights.sum(),
        retired=_retired_symbols(species, set(symbol_index(reference)), rng),
    )


def _retired_symbols(species: str, known: set[str], rng: np.random.Generator) -> np.ndarray:
    """Clone-style symbols (RP11-34P13.7) that the reference does not know, in seeded order."""
    letters = np.array(list("ABCDEFGHIJKLMNOP"))
    names: list[str] = []
    while len(names) < 200:
        name = (
            f"{RETIRED_PREFIX[species]}{rng.integers(1, 1000)}{rng.choice(letters)}"
            f"{rng.integers(1, 25)}.{rng.integers(1, 10)}"
        )
        if name not in known and name.upper() not in known and name not in names:
            names.append(name)
    return np.array(names)


def _panel(
    model: _SpeciesModel, recipe: _Recipe, rng: np.random.Generator, *, retired: bool
) -> _Panel:
    """Draw the genes of a dataset, in a shuffled file order, with its batch shift."""
    optional = np.flatnonzero(~model.required)
    n_optional = recipe.n_genes - int(model.required.sum())
    chosen = np.sort(
        np.concatenate(
            [np.flatnonzero(model.required), rng.choice(optional, n_optional, replace=False)]
        )
    )
    n_retired = round(recipe.unmapped_fraction * recipe.n_genes) if retired else 0
    n_mito = model.mito_ids.size
    gene_ids = np.concatenate([model.gene_ids[chosen], model.mito_ids, np.full(n_retired, "")])
    gene_names = np.concatenate(
        [model.gene_names[chosen], model.mito_names, model.retired[:n_retired]]
    )
    mito_share = np.concatenate([np.zeros(chosen.size), model.mito_weights, np.zeros(n_retired)])
    # Mitochondrial genes get their counts separately (weights in the species model); their
    # baseline here only has to be finite.
    baseline = np.concatenate(
        [model.baseline[chosen], np.zeros(n_mito), rng.normal(-0.5, 1.2, size=n_retired)]
    )
    baseline += rng.normal(0.0, 0.3, size=baseline.size)  # dataset batch effect
    dispersion = np.concatenate(
        [model.dispersion[chosen], np.full(n_mito, 0.1), np.full(n_retired, 0.2)]
    )
    lfc = {
        name: np.concatenate([values[chosen], np.zeros(n_mito + n_retired)])
        for name, values in model.programs.items()
    }
    # Real files order genes by genome position, not by ID; readers must not assume either.
    order = rng.permutation(gene_ids.size)
    return _Panel(
        gene_ids=gene_ids[order],
        gene_names=gene_names[order],
        is_mito=mito_share[order] > 0,
        mito_share=mito_share[order],
        baseline=baseline[order],
        dispersion=dispersion[order],
        lfc={name: values[order] for name, values in lfc.items()},
    )


def _type_counts(fractions: np.ndarray, n_cells: int) -> np.ndarray:
    """Cells per type by largest remainder, at least one each so every type is present."""
    exact = fractions / fractions.sum() * n_cells
    counts = np.maximum(np.floor(exact).astype(int), 1)
    remainder = exact - np.floor(exact)
    for index in np.argsort(-remainder, kind="stable"):
        if counts.sum() >= n_cells:
            break
        counts[index] += 1
    while counts.sum() > n_cells:
        counts[np.argmax(counts)] -= 1
    return counts


def _simulate(
    model: _SpeciesModel,
    recipe: _Recipe,
    panel: _Panel,
    rng: np.random.Generator,
    n_cells: int,
    *,
    gene_shift: np.ndarray | None = None,
    umi_scale: float = 1.0,
) -> _Cells:
    """Gamma-Poisson counts of `n_cells` cells, about 2% of which must fail QC."""
    programs = [t[0] for t in recipe.types]
    labels_of = [t[1] for t in recipe.types]
    per_type = _type_counts(np.array([t[2] for t in recipe.types]), n_cells)
    type_index = rng.permutation(np.repeat(np.arange(len(programs)), per_type))

    # Failing cells: tiny libraries, ambient-like droplets (few genes), dying cells (mito).
    n_fail = max(3, round(0.02 * n_cells))
    kind = np.zeros(n_cells, dtype=int)
    kind[rng.choice(n_cells, n_fail, replace=False)] = np.arange(n_fail) % 3 + 1
    low_counts, few_genes, high_mito = kind == 1, kind == 2, kind == 3

    shift = np.array([model.size_shift[p] for p in programs])[type_index]
    umis = np.exp(rng.normal(np.log(recipe.median_umis * umi_scale) + shift, 0.4))
    umis = np.maximum(umis, 1000.0)  # healthy cells clear any usual min_counts / min_genes
    umis[low_counts] = rng.uniform(30.0, 150.0, size=int(low_counts.sum()))
    umis[few_genes] = rng.uniform(600.0, 1000.0, size=int(few_genes.sum()))
    mito_fraction = np.minimum(rng.beta(2.0, 2.0 / recipe.mito_mean - 2.0, n_cells), 0.12)
    mito_fraction[high_mito] = rng.uniform(0.4, 0.8, size=int(high_mito.sum()))

    log_weights = panel.baseline + (0.0 if gene_shift is None else gene_shift)
    nuclear = np.where(panel.is_mito, -np.inf, log_weights)
    profiles = np.stack([_softmax(nuclear + panel.lfc[p]) for p in programs])
    mean = profiles[type_index] * ((1.0 - mito_fraction) * umis)[:, None]
    # An empty droplet holds ambient RNA: the few most abundant transcripts only.
    ambient_genes = np.argsort(-nuclear, kind="stable")[:40]
    ambient = np.zeros(panel.gene_ids.size)
    ambient[ambient_genes] = _softmax(nuclear[ambient_genes])
    mean[few_genes] = ambient * ((1.0 - mito_fraction[few_genes]) * umis[few_genes])[:, None]
    mean[:, panel.is_mito] = (mito_fraction * umis)[:, None] * panel.mito_share[panel.is_mito]

    phi = panel.dispersion[None, :]
    rate = rng.gamma(1.0 / phi, mean * phi)
    counts = rng.poisson(rate)
    return _Cells(
        counts=counts,
        labels=np.array(labels_of)[type_index],
        barcodes=_barcodes(rng, n_cells),
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x[np.isfinite(x)].max())
    return z / z.sum()


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique random 16-mers, like 10x cell barcodes."""
    bases = np.array(list("ACGT"))
    seen: dict[str, None] = {}
    while len(seen) < n:
        for row in bases[rng.integers(0, 4, size=(n, 16))]:
            seen.setdefault("".join(row), None)
    return np.array(list(seen)[:n])


def _log_normalize(counts: np.ndarray) -> np.ndarray:
    """log1p of counts per 10,000, as scanpy's normalize_total + log1p."""
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    return np.log1p(counts / np.maximum(totals, 1.0) * 1e4).astype(np.float32)


def _dataset_rng(seed: int, name: str, *keys: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "demo", name, *keys))


# ---------------------------------------------------------------------------------------------
# Writers: one per storage layout


def _write_pbmc_ids(path: Path, model: _SpeciesModel, seed: int, n_cells: int) -> None:
    name = "demo_pbmc_ids"
    rng = _dataset_rng(seed, name)
    panel = _panel(model, _RECIPES[name], rng, retired=False)
    cells = _simulate(model, _RECIPES[name], panel, rng, n_cells)
    adata = ad.AnnData(
        X=sp.csr_matrix(cells.counts.astype(np.int32)),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(cells.labels)},
            index=pd.Index([f"{b}-1" for b in cells.barcodes]),
        ),
        var=pd.DataFrame({"gene_name": panel.gene_names}, index=pd.Index(panel.gene_ids)),
        uns={"species": model.species, "source": _SOURCE},
    )
    adata.write_h5ad(path, compression="gzip")


def _write_pbmc_symbols(path: Path, model: _SpeciesModel, seed: int, n_cells: int) -> None:
    name = "demo_pbmc_symbols"
    rng = _dataset_rng(seed, name)
    panel = _panel(model, _RECIPES[name], rng, retired=True)
    cells = _simulate(model, _RECIPES[name], panel, rng, n_cells)
    counts = cells.counts.astype(np.float32)
    adata = ad.AnnData(
        X=_log_normalize(cells.counts),
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical(cells.labels),
                "n_counts": counts.sum(axis=1),
                "n_genes": (cells.counts > 0).sum(axis=1),
                "percent_mito": counts[:, panel.is_mito].sum(axis=1) / counts.sum(axis=1),
            },
            index=pd.Index([f"{b}-1" for b in cells.barcodes]),
        ),
        # What `var_names_make_unique` makes of duplicated symbols: SLC25A6, SLC25A6-1.
        var=pd.DataFrame(
            {"gene_symbols": panel.gene_names},
            index=ad.utils.make_index_unique(pd.Index(panel.gene_names)),
        ),
        layers={"counts": counts},
    )
    adata.write_h5ad(path, compression="gzip")


def _write_brain(path: Path, model: _SpeciesModel, seed: int, n_cells: int) -> None:
    name = "demo_brain"
    rng = _dataset_rng(seed, name)
    panel = _panel(model, _RECIPES[name], rng, retired=False)
    cells = _simulate(model, _RECIPES[name], panel, rng, n_cells)
    n = cells.labels.size
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(cells.labels),
            "cell_type_ontology_term_id": pd.Categorical(
                [_BRAIN_ONTOLOGY[label] for label in cells.labels]
            ),
            "organism_ontology_term_id": pd.Categorical([NCBI_TAXON["mmusculus"]] * n),
            "organism": pd.Categorical(["Mus musculus"] * n),
            "assay_ontology_term_id": pd.Categorical(["EFO:0009922"] * n),
            "assay": pd.Categorical(["10x 3' v3"] * n),
            "tissue_ontology_term_id": pd.Categorical(["UBERON:0000955"] * n),
            "tissue": pd.Categorical(["brain"] * n),
            "disease_ontology_term_id": pd.Categorical(["PATO:0000461"] * n),
            "donor_id": pd.Categorical(rng.choice(["mouse_1", "mouse_2"], n)),
            "suspension_type": pd.Categorical(["cell"] * n),
            "is_primary_data": np.ones(n, dtype=bool),
        },
        index=pd.Index([f"{b}-1" for b in cells.barcodes]),
    )
    var = pd.DataFrame(
        {
            "feature_is_filtered": np.zeros(panel.gene_ids.size, dtype=bool),
            "feature_name": pd.Categorical(panel.gene_names),
            "feature_reference": pd.Categorical([NCBI_TAXON["mmusculus"]] * panel.gene_ids.size),
            "feature_biotype": pd.Categorical(["gene"] * panel.gene_ids.size),
        },
        index=pd.Index(panel.gene_ids),
    )
    raw = ad.AnnData(X=sp.csr_matrix(cells.counts.astype(np.float32)), obs=obs, var=var)
    adata = raw.copy()
    adata.raw = raw
    adata.X = sp.csr_matrix(_log_normalize(cells.counts))
    adata.uns["title"] = "Demo mouse brain (SIMULATED)"
    adata.uns["schema_version"] = "5.3.0"
    adata.write_h5ad(path, compression="gzip")


def _write_retina(path: Path, model: _SpeciesModel, seed: int, n_cells: int) -> None:
    name = "demo_retina"
    recipe = _RECIPES[name]
    panel = _panel(model, recipe, _dataset_rng(seed, name), retired=True)
    path.mkdir()
    sizes = [n_cells // len(RETINA_FILES)] * len(RETINA_FILES)
    sizes[-1] += n_cells - sum(sizes)
    for index, (filename, size) in enumerate(zip(RETINA_FILES, sizes, strict=True)):
        rng = _dataset_rng(seed, name, filename)
        # Two batches of one tissue: a small gene-wise shift and a different depth.
        shift = rng.normal(0.0, 0.15, size=panel.gene_ids.size)
        cells = _simulate(
            model, recipe, panel, rng, size, gene_shift=shift, umi_scale=1.0 - 0.2 * index
        )
        _write_loom(
            path / filename,
            counts=cells.counts,
            genes=panel.gene_names,
            cell_ids=np.array([f"retina_batch{index + 1}:{b}x" for b in cells.barcodes]),
            clusters=cells.labels,
            title=f"Demo mouse retina, batch {index + 1} (SIMULATED)",
        )


def _write_loom(
    path: Path,
    *,
    counts: np.ndarray,
    genes: np.ndarray,
    cell_ids: np.ndarray,
    clusters: np.ndarray,
    title: str,
) -> None:
    """A loom file as loompy and older tools wrote them: genes x cells int64 `/matrix`."""
    with h5py.File(path, "w") as f:
        f.attrs["title"] = np.bytes_(title)
        f.attrs["description"] = np.bytes_(_SOURCE)
        f.create_dataset(
            "matrix",
            data=counts.T.astype(np.int64),
            chunks=(min(64, counts.shape[1]), min(64, counts.shape[0])),
            maxshape=(counts.shape[1], None),
            compression="gzip",
            compression_opts=2,
            track_times=False,
        )
        for group in ("row_attrs", "col_attrs", "layers", "row_graphs", "col_graphs"):
            f.create_group(group)
        _bytes_dataset(f, "row_attrs/Gene", genes)
        _bytes_dataset(f, "col_attrs/CellID", cell_ids)
        _bytes_dataset(f, "col_attrs/Cell_cluster", clusters)


def _bytes_dataset(f: h5py.File, name: str, values: np.ndarray, **kwargs: object) -> None:
    """Fixed-length byte strings, as loom and Cell Ranger store text."""
    data = np.array([str(v).encode() for v in values])
    if data.dtype.itemsize == 0:  # all empty: h5py cannot store |S0
        data = data.astype("S1")
    f.create_dataset(name, data=data, track_times=False, **kwargs)  # type: ignore[arg-type]


def _write_pbmc_10x(path: Path, model: _SpeciesModel, seed: int, n_cells: int) -> None:
    name = "demo_pbmc_10x"
    rng = _dataset_rng(seed, name)
    panel = _panel(model, _RECIPES[name], rng, retired=False)
    cells = _simulate(model, _RECIPES[name], panel, rng, n_cells)
    # Antibody counts: a background for every cell, a strong signal on the expressing types,
    # scaled by the cell's library so that failing cells stay small.
    depth = cells.counts.sum(axis=1) / np.median(cells.counts.sum(axis=1))
    adt_mean = (
        np.stack(
            [np.where(np.isin(cells.labels, carriers), 400.0, 15.0) for _, carriers in _ANTIBODIES],
            axis=1,
        )
        * depth[:, None]
    )
    adt = rng.poisson(rng.gamma(1.0 / 0.3, adt_mean * 0.3))
    matrix = sp.csr_matrix(np.concatenate([cells.counts, adt], axis=1))  # = CSC of features
    n_genes = panel.gene_ids.size
    antibodies = [a for a, _ in _ANTIBODIES]
    sequences = ["".join(row) for row in np.array(list("ACGT"))[rng.integers(0, 4, (7, 15))]]
    with h5py.File(path, "w") as f:
        f.attrs["chemistry_description"] = "Single Cell 3' v3"
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = np.array([b"demo_pbmc_10x"])
        f.attrs["original_gem_groups"] = np.array([1])
        f.attrs["software_version"] = "cellranger-6.0.0"
        f.attrs["version"] = np.int64(2)
        f.attrs["description"] = _SOURCE
        group = f.create_group("matrix")
        _bytes_dataset(f, "matrix/barcodes", np.array([f"{b}-1" for b in cells.barcodes]), **_GZIP)
        for key, values, dtype in (
            ("data", matrix.data, np.int32),
            ("indices", matrix.indices, np.int64),
            ("indptr", matrix.indptr, np.int64),
            ("shape", np.array([matrix.shape[1], matrix.shape[0]]), np.int32),
        ):
            group.create_dataset(
                key,
                data=values.astype(dtype),
                chunks=(max(1, min(80000, values.size)),),
                maxshape=(None,),
                track_times=False,
                **_GZIP,
            )
        features = {
            "id": [*panel.gene_ids, *antibodies],
            "name": [*panel.gene_names, *antibodies],
            "feature_type": ["Gene Expression"] * n_genes + ["Antibody Capture"] * len(antibodies),
            "genome": ["GRCh38"] * n_genes + [""] * len(antibodies),
            "pattern": [""] * n_genes + ["^NNNNNNNNNN(BC)NNNNNNNNN"] * len(antibodies),
            "read": [""] * n_genes + ["R2"] * len(antibodies),
            "sequence": [""] * n_genes + sequences,
        }
        group.create_group("features")
        for key, values in features.items():
            _bytes_dataset(f, f"matrix/features/{key}", np.array(values), **_GZIP)
        _bytes_dataset(
            f, "matrix/features/_all_tag_keys", np.array(["genome", "read", "pattern", "sequence"])
        )


_GZIP: dict[str, object] = {"compression": "gzip", "compression_opts": 4}
_SOURCE = "cellfoundry demo corpus: SIMULATED counts on real GENCODE genes; not measured data"
_WRITERS = {
    "demo_pbmc_ids": _write_pbmc_ids,
    "demo_pbmc_symbols": _write_pbmc_symbols,
    "demo_pbmc_10x": _write_pbmc_10x,
    "demo_brain": _write_brain,
    "demo_retina": _write_retina,
}
