"""Old gene symbols: current > earlier symbol of a still-current gene > unambiguous alias
(issue 13, point 11)."""

from __future__ import annotations

import warnings
from collections import Counter

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from cellfoundry.preprocess import map_genes
from cellfoundry.reference import (
    CLONE_NAME,
    RELEASE_SOURCES,
    SymbolIndex,
    load_bundled,
    symbol_history,
    symbol_index,
    symbol_lookup,
)


@pytest.fixture(scope="module")
def human_index(human) -> SymbolIndex:
    return symbol_lookup(human)


@pytest.fixture(scope="module")
def mouse_index(mouse) -> SymbolIndex:
    return symbol_lookup(mouse)


def test_previous_hgnc_symbols_reach_todays_genes(human, human_index):
    current = symbol_index(human)
    # Highly expressed genes renamed by HGNC, as older references name them.
    renamed = {
        "IL8": "CXCL8",
        "GNB2L1": "RACK1",
        "ATP5E": "ATP5F1E",
        "TCEB2": "ELOB",
        "H3F3B": "H3-3B",
        "SEPT7": "SEPTIN7",
        "C6ORF48": "SNHG32",  # upper-cased by a tool: previous symbol C6orf48
    }
    for old, new in renamed.items():
        match = human_index.lookup(old)
        assert match.gene_id == current[new], old
        assert match.how == ("previous-case" if old == "C6ORF48" else "previous")


@pytest.mark.parametrize("species", ["hsapiens", "mmusculus"])
def test_a_current_symbol_always_gives_its_current_gene(species):
    """No history row can pull a current symbol away from the gene it names today."""
    reference = load_bundled(species)
    index = symbol_lookup(reference)
    current = symbol_index(reference, fold_case=False)
    rows = symbol_history(species)
    shadowed = {symbol for symbol, _, _ in rows if symbol in current}
    assert len(shadowed) > 300  # names that moved between genes exist, and are tested
    for symbol in shadowed:
        assert index.lookup(symbol) == (current[symbol], "exact")


def test_ambiguous_retired_and_clone_names_are_dropped_and_said(human):
    genes = human.table.filter(human.table["gene_type"] == "protein_coding").head(3)
    a, b, c = genes["gene_id"].to_list()
    rows = [
        ("OLDA", a, "gencode_v38"),  # one earlier gene: maps
        ("TWICE", a, "gencode_v38"),  # two genes: ambiguous
        ("TWICE", b, "hgnc_previous"),
        ("GONE", "ENSG99999999999", "gencode_v38"),  # its gene left the reference
        ("ALIASC", c, "hgnc_alias"),
        ("SHARED", a, "hgnc_alias"),
        ("SHARED", b, "hgnc_alias"),
        ("AC000001.1", c, "xclone_hg38"),  # clone-based: only within its release
        ("PREVC", c, "hgnc_previous"),
        ("PREVC", a, "hgnc_alias"),  # an earlier symbol outranks an alias
    ]
    index = SymbolIndex.build(human, rows)
    assert index.lookup("OLDA") == (a, "previous")
    assert index.lookup("olda") == (a, "previous-case")
    assert index.lookup("OLDA-1") == (a, "previous")  # var_names_make_unique
    assert index.lookup("TWICE") == (None, "ambiguous")
    assert index.lookup("GONE") == (None, "retired")
    assert index.lookup("ALIASC") == (c, "synonym")
    assert index.lookup("SHARED") == (None, "ambiguous")
    assert index.lookup("PREVC") == (c, "previous")
    assert index.lookup("AC000001.1") == (None, "clone")
    assert index.lookup("AC000001.1", "xclone_hg38") == (c, "previous")
    assert index.lookup("NOPE") == (None, "unknown")
    current_name = genes["gene_name"][0]
    assert index.lookup(current_name) == (a, "exact")
    assert index.lookup(current_name.lower()) == (a, "case")

    # In one file: the release of its clone names is found, and an earlier symbol that lands
    # on a gene the file also names by its current symbol is dropped.
    mapped = index.map([current_name, "OLDA", "AC000001.1", "TWICE"])
    assert mapped.release == "xclone_hg38"
    assert mapped.gene_ids == [a, None, c, None]
    assert mapped.how == ["exact", "collision", "previous", "ambiguous"]


def pbmc5k(shared_data) -> ad.AnnData:
    return ad.read_h5ad(shared_data / "human_pbmc5k_protein_v3_200cells.h5ad")


def test_pbmc5k_symbols_map_through_history(shared_data, human):
    adata = pbmc5k(shared_data)
    mapping = map_genes(adata.var, human)
    counts = np.asarray(adata.X).sum(axis=0)
    mapped = np.array([g is not None for g in mapping.gene_ids])
    gene_rate, count_rate = mapped.mean(), counts[mapped].sum() / counts.sum()
    assert gene_rate >= 0.87 and count_rate >= 0.995
    # Current symbols alone: 83.6% of genes, 98.1% of counts.
    current = symbol_lookup(human, history=False).map(list(adata.var_names))
    alone = np.array([g is not None for g in current.gene_ids])
    assert alone.mean() < 0.84 and counts[alone].sum() / counts.sum() < 0.985
    # Its clone-based lncRNA names are Cell Ranger GRCh38-3.0.0's (Ensembl 93).
    assert mapping.release == "xclone_hg38"
    matches = mapping.symbol_matches
    assert sum(matches.values()) == adata.n_vars
    assert matches["previous"] > 2_000 and matches["ambiguous"] > 0
    assert sum(v for k, v in matches.items() if k in ("exact", "case")) == alone.sum()


@pytest.mark.parametrize("dataset", ["pbmc1k", "mouse_e18"])
def test_symbols_map_to_the_ids_the_file_itself_gives(shared_data, dataset, human, mouse):
    """Files with both IDs and symbols are the ground truth: every symbol that maps through
    an earlier name or an alias lands on the file's own gene (where that gene still exists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if dataset == "pbmc1k":
            adata = sc.read_10x_h5(shared_data / "human_pbmc1k_10x_cellranger6.h5")
            symbols, truth, reference = list(adata.var_names), adata.var["gene_ids"], human
        else:
            adata = ad.read_h5ad(shared_data / "mouse_e18_brain_10k_cells_1000genes.h5ad")
            symbols, truth, reference = list(adata.var["gene_name"]), adata.var_names, mouse
    known = set(reference.table["gene_id"].to_list())
    mapping = symbol_lookup(reference).map(symbols)
    outcome = Counter()
    for gene_id, how, own in zip(mapping.gene_ids, mapping.how, truth, strict=True):
        if gene_id is not None and how not in ("exact", "case") and own in known:
            outcome["right" if gene_id == own else "wrong"] += 1
    assert outcome["wrong"] == 0
    assert outcome["right"] >= (500 if dataset == "pbmc1k" else 40)
    # pbmc1k names lncRNAs as GENCODE v32 does, a release not bundled: its clone-based names
    # stay unmapped rather than being read in another release.
    if dataset == "pbmc1k":
        assert mapping.release is None
        assert Counter(mapping.how)["clone"] > 10_000


def test_mouse_loom_symbols_map_through_history(shared_data, mouse):
    with h5py.File(shared_data / "mouse_sympathetic_furlan2016.loom", "r") as f:
        symbols = [s.decode() for s in f["row_attrs/Gene"][:]]
        counts = f["matrix"][:].sum(axis=1)
    mapping = map_genes(pd.DataFrame(index=pd.Index(symbols, dtype=str)), mouse)
    mapped = np.array([g is not None for g in mapping.gene_ids])
    current = symbol_lookup(mouse, history=False).map(symbols)
    alone = np.array([g is not None for g in current.gene_ids])
    assert mapped.mean() > alone.mean() + 0.05  # 89.7% -> 97.7% of genes
    assert counts[mapped].sum() / counts.sum() > 0.99


def test_history_tables_cover_the_release_sources():
    for species in ("hsapiens", "mmusculus"):
        rows = symbol_history(species)
        sources = {source for _, _, source in rows}
        assert sources & RELEASE_SOURCES
        clones = [s for s, _, source in rows if CLONE_NAME.match(s)]
        assert clones  # clone-based names are kept, to be read within their release
