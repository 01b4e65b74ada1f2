"""Random batches of cells from many memory-mapped shards, tokenized as they load.

`ShardCollection` opens every shard of a manifest with `numpy.load(mmap_mode='r')` and serves
a batch with ONE compiled gather over all shards: the batch's cells are sorted, each cell's
row is copied from its shard, dataset gene positions are mapped to the species' token ids
through a per-shard lookup table, and genes outside the vocabulary are dropped. Batches stay
sparse (flat arrays plus row offsets) until the model's collate pads or packs them.

Rank order (Geneformer) needs the species' corpus medians, which change when datasets are
added; the loader applies them at read time (`rank_batch`), so shards never need rewriting.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import polars as pl
from numba.typed import List as TypedList

from cellfoundry.discretize import rank_order
from cellfoundry.io import read_json
from cellfoundry.vocabulary import TokenMapping


@dataclass
class SparseBatch:
    """Cells as flat arrays with row offsets (CSR), in token space."""

    cells: np.ndarray  # int64 [B], global cell ids in the collection
    offsets: np.ndarray  # int64 [B + 1]
    tokens: np.ndarray  # int32 [nnz], the species' token ids
    counts: np.ndarray  # int32 [nnz], raw counts
    bins: np.ndarray  # uint8 [nnz], quantile bins
    shard: np.ndarray  # int32 [B], shard index of each cell

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class Shard:
    """One opened shard."""

    path: Path
    meta: dict
    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    bins: np.ndarray
    total_counts: np.ndarray
    gene_ids: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def species(self) -> str:
        return self.meta["species"]

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    def obs(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "obs.parquet")


def open_shard(path: str | Path) -> Shard:
    """Memory-map a shard written by `cellfoundry.shards.write_shard`."""
    path = Path(path)
    arrays = {
        name: np.load(path / f"{name}.npy", mmap_mode="r")
        for name in ("indptr", "indices", "counts", "bins")
    }
    return Shard(
        path=path,
        meta=read_json(path / "shard.json"),
        total_counts=np.load(path / "total_counts.npy"),
        gene_ids=pl.read_parquet(path / "var.parquet")["gene_id"].to_numpy(),
        **arrays,
    )


class ShardCollection:
    """Many shards addressed by one global cell index.

    Parameters
    ----------
    shards
        Shard folders, in a fixed order (the manifest's).
    token_mappings
        Token mapping of every species present.
    medians
        Per species, a table with `gene_id` and `nonzero_median` (`gene_stats.summarize`),
        needed only for rank order.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        token_mappings: Mapping[str, TokenMapping],
        *,
        medians: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        self.shards = [open_shard(p) for p in shards]
        self.token_mappings = dict(token_mappings)
        sizes = np.array([s.n_cells for s in self.shards], dtype=np.int64)
        self.cell_offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.luts = [self.token_mappings[s.species].tokens(s.gene_ids) for s in self.shards]
        self._indptr = TypedList([np.asarray(s.indptr) for s in self.shards])
        self._indices = TypedList([np.asarray(s.indices) for s in self.shards])
        self._counts = TypedList([np.asarray(s.counts) for s in self.shards])
        self._bins = TypedList([np.asarray(s.bins) for s in self.shards])
        self._luts = TypedList(self.luts)
        self.total_counts = (
            np.concatenate([s.total_counts for s in self.shards]) if self.shards else np.zeros(0)
        )
        self._gene_scale: dict[str, np.ndarray] | None = None
        if medians is not None:
            self._gene_scale = {
                species: _token_scale(self.token_mappings[species], table)
                for species, table in medians.items()
            }

    def __len__(self) -> int:
        return int(self.cell_offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard_of(self, cells: np.ndarray) -> np.ndarray:
        """Shard index of each global cell id."""
        return (np.searchsorted(self.cell_offsets, cells, side="right") - 1).astype(np.int32)

    def cell_lengths(self) -> np.ndarray:
        """Expressed genes per cell (before vocabulary filtering), in global order."""
        return (
            np.concatenate([np.diff(np.asarray(s.indptr)) for s in self.shards])
            if self.shards
            else np.zeros(0, int)
        )

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each shard's cells in the global index."""
        return [
            (int(a), int(b))
            for a, b in zip(self.cell_offsets[:-1], self.cell_offsets[1:], strict=True)
        ]

    def gather(self, cells: np.ndarray) -> SparseBatch:
        """The cells, sorted, with genes as token ids (genes outside the vocabulary dropped)."""
        cells = np.sort(np.asarray(cells, dtype=np.int64))
        if cells.size and (cells[0] < 0 or cells[-1] >= len(self)):
            raise IndexError(f"cell ids must lie in [0, {len(self)})")
        shard = self.shard_of(cells)
        local = cells - self.cell_offsets[shard]
        offsets, tokens, counts, bins = _gather(
            self._indptr, self._indices, self._counts, self._bins, self._luts, shard, local
        )
        return SparseBatch(cells, offsets, tokens, counts, bins, shard)

    def rank_batch(
        self, batch: SparseBatch, *, max_len: int, target_sum: float = 10_000.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Geneformer rank order of a gathered batch: (offsets, tokens), top `max_len` per cell.

        Each gene's value is count / cell total x target_sum / the gene's non-zero median over
        the species' corpus; tokens are sorted by it, descending (ties by token id).
        """
        if self._gene_scale is None:
            raise ValueError("rank order needs corpus medians: pass medians= to ShardCollection")
        entry_shard = np.repeat(batch.shard, batch.lengths)
        scale = np.zeros(len(batch.tokens), dtype=np.float64)
        species_of_shard = np.array([s.species for s in self.shards], dtype=object)
        for species in np.unique(species_of_shard[batch.shard]):
            entries = species_of_shard[entry_shard] == species
            scale[entries] = self._gene_scale[species][batch.tokens[entries]]
        # Rank entries (not genes): the per-entry scale carries each cell's species, and ties
        # fall back to entry order, i.e. the dataset's gene order.
        entries = np.arange(len(batch.tokens), dtype=np.int64)
        offsets, ranked = rank_order(
            batch.offsets,
            entries,
            batch.counts,
            self.total_counts[batch.cells],
            scale,
            max_len,
            target_sum,
        )
        return offsets, batch.tokens[ranked]


def _token_scale(mapping: TokenMapping, medians: pl.DataFrame) -> np.ndarray:
    """1 / non-zero median per token id (0 for special tokens and genes without a median)."""
    scale = np.zeros(mapping.n_tokens, dtype=np.float64)
    table = mapping.gene_table.join(
        medians.select("gene_id", "nonzero_median"), on="gene_id", how="inner"
    )
    table = table.filter(pl.col("nonzero_median") > 0)
    scale[table["token"].to_numpy()] = 1.0 / table["nonzero_median"].to_numpy()
    return scale


@numba.njit(cache=True, nogil=True)
def _gather(indptr, indices, counts, bins, luts, shard, local):  # pragma: no cover - compiled
    n = len(shard)
    total = 0
    for i in range(n):
        p = indptr[shard[i]]
        total += p[local[i] + 1] - p[local[i]]
    offsets = np.empty(n + 1, dtype=np.int64)
    tokens = np.empty(total, dtype=np.int32)
    out_counts = np.empty(total, dtype=np.int32)
    out_bins = np.empty(total, dtype=np.uint8)
    k = 0
    offsets[0] = 0
    for i in range(n):
        s = shard[i]
        p = indptr[s]
        idx = indices[s]
        cnt = counts[s]
        bns = bins[s]
        lut = luts[s]
        for j in range(p[local[i]], p[local[i] + 1]):
            token = lut[idx[j]]
            if token >= 0:
                tokens[k] = token
                out_counts[k] = cnt[j]
                out_bins[k] = bns[j]
                k += 1
        offsets[i + 1] = k
    return offsets, tokens[:k], out_counts[:k], out_bins[:k]


def random_batches(
    n_cells: int, batch_size: int, *, seed: int, epoch: int = 0, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Batches of a seeded random permutation of the cells (one epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_cells)
    stop = (n_cells // batch_size) * batch_size if drop_last else n_cells
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def open_manifest(manifest: str | Path, split: str) -> list[Path]:
    """Shard folders of one split of a shard manifest (`manifests/shards.parquet`)."""
    frame = pl.read_parquet(manifest).filter(pl.col("split") == split)
    return [Path(p) for p in frame["shard"].to_list()]
