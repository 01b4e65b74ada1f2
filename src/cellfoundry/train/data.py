"""Data for training: a multi-species vocabulary layout, batch plans, and the LightningDataModule.

Batches are planned, not drawn: global batch k of a run is a pure function of (seed, k), so a
run resumed from a checkpoint at step s continues with exactly the batches an uninterrupted run
would have seen, and the global batch is the same whatever the number of ranks (each rank takes
its slice). Tokenization (the objective's `collate`) runs in the Dataset, hence in worker
processes when `num_workers > 0`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellfoundry.config import schema_default
from cellfoundry.loader import ShardCollection, SparseBatch
from cellfoundry.seeds import derive_seed
from cellfoundry.vocabulary import CLS, MASK, PAD, SPECIAL_TOKENS, TokenMapping

log = logging.getLogger(__name__)

SPECIALS = (CLS, PAD, MASK)
# Geneformer V2 ends each cell with <eos>; the token exists in the model, not in token mappings.
EOS = "<eos>"


@dataclass(frozen=True)
class VocabularyLayout:
    """One token space for several species: the special tokens (`<cls>` 0, `<pad>` 1,
    `<mask>` 2, and `<eos>` 3 for Geneformer V2 inputs), then each species' genes in a block of
    their own (species sorted by name, genes in token order).

    Species' token mappings each start their genes at 3, so the same local id means different
    genes in different species; `local_to_global[species]` maps a species' local ids to model ids.
    """

    species: tuple[str, ...]
    offsets: dict[str, int]
    local_to_global: dict[str, np.ndarray]
    n_tokens: int
    specials: tuple[str, ...] = SPECIALS

    cls_id = 0
    pad_id = 1
    mask_id = 2

    @classmethod
    def from_mappings(
        cls, mappings: Mapping[str, TokenMapping], *, specials: Sequence[str] = SPECIALS
    ) -> VocabularyLayout:
        specials = tuple(specials)
        if specials[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"the special tokens must start with {SPECIALS}, not {specials}")
        offsets, tables, start = {}, {}, len(specials)
        for species in sorted(mappings):
            mapping = mappings[species]
            lut = np.full(mapping.n_tokens, -1, dtype=np.int64)
            for i, name in enumerate(SPECIALS):
                lut[mapping.token_of(name)] = i
            genes = mapping.gene_table["token"].to_numpy()
            lut[np.sort(genes)] = start + np.arange(len(genes))
            offsets[species], tables[species] = start, lut
            start += len(genes)
        return cls(tuple(sorted(mappings)), offsets, tables, start, specials)

    @property
    def n_specials(self) -> int:
        """Model ids below this are special tokens; genes start here."""
        return len(self.specials)

    @property
    def eos_id(self) -> int:
        if EOS not in self.specials:
            raise ValueError("this vocabulary layout has no <eos> token")
        return self.specials.index(EOS)

    def gene_range(self, species: str) -> tuple[int, int]:
        """[low, high) model ids of a species' genes."""
        low = self.offsets[species]
        return low, low + int((self.local_to_global[species] >= len(SPECIALS)).sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "species": list(self.species),
            "offsets": self.offsets,
            "n_tokens": self.n_tokens,
            "specials": list(self.specials),
        }


def specials_for(input_layout: str) -> tuple[str, ...]:
    """The model's special tokens for an input layout (`train.input_layout`)."""
    return (*SPECIALS, EOS) if input_layout == "geneformer_v2" else SPECIALS


def restrict_genes(
    mapping: TokenMapping, reference: pl.DataFrame, gene_types: Sequence[str], *, source: str
) -> TokenMapping:
    """The token mapping's genes whose `gene_type` (in the gene reference) is listed, renumbered
    to consecutive tokens after the special tokens (scConcept's format) in their order.

    Raises ValueError naming `source` when no gene is left.
    """
    types = reference.select("gene_id", "gene_type")
    genes = mapping.gene_table.join(types, on="gene_id", how="left")
    kept = genes.filter(pl.col("gene_type").is_in(list(gene_types))).sort("token")
    if kept.height == 0:
        found = sorted(set(genes["gene_type"].drop_nulls().to_list()))[:10]
        raise ValueError(
            f"train.gene_types {list(gene_types)}: no gene of the {mapping.species} token "
            f"mapping has such a gene_type in {source} (types there: {', '.join(found) or 'none'})"
        )
    specials = mapping.table.filter(pl.col("gene_id").is_in(list(SPECIAL_TOKENS))).sort("token")
    table = pl.concat(
        [
            specials.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("token")),
            kept.select("gene_id", "gene_name").with_columns(
                (pl.int_range(pl.len(), dtype=pl.Int64) + specials.height).alias("token")
            ),
        ]
    )
    return TokenMapping(mapping.species, table.select("gene_id", "gene_name", "token"))


@dataclass(frozen=True)
class SplitData:
    """The shards of one split with what tokenization needs."""

    collection: ShardCollection
    layout: VocabularyLayout
    datasets: np.ndarray  # dataset index of each shard
    species: np.ndarray  # species name of each shard
    dataset_names: tuple[str, ...] = ()  # name of each dataset index

    @property
    def n_cells(self) -> int:
        return len(self.collection)

    def dataset_name(self, index: int) -> str:
        return self.dataset_names[index] if self.dataset_names else str(index)


def open_split(
    manifest: str | Path,
    split: str,
    mappings: Mapping[str, TokenMapping],
    layout: VocabularyLayout,
    *,
    medians: Mapping[str, pl.DataFrame] | None = None,
) -> SplitData:
    """Open the shards of `split` listed in a shard manifest."""
    frame = pl.read_parquet(manifest).filter(pl.col("split") == split)
    if frame.height == 0:
        raise ValueError(f"the shard manifest {manifest} lists no '{split}' files")
    collection = ShardCollection(frame, mappings, medians=medians, to_model=layout.local_to_global)
    names = frame["dataset"].to_list()
    ordered = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(ordered)}
    return SplitData(
        collection,
        layout,
        np.array([index[n] for n in names]),
        np.array(frame["species"].to_list(), dtype=object),
        ordered,
    )


def genes_outside_vocabulary(data: SplitData) -> dict[str, tuple[int, int]]:
    """Per dataset: (genes outside the model's vocabulary, genes), over the union of its files
    (`loader.ShardCollection.genes_outside_vocabulary`)."""
    return data.collection.genes_outside_vocabulary()


def log_genes_outside_vocabulary(data: SplitData, split: str) -> None:
    """One log line per dataset with the genes the loader drops (outside the vocabulary)."""
    for name, (n_outside, n_genes) in genes_outside_vocabulary(data).items():
        log.info(
            "%s (%s): %d of %d genes are outside the model's vocabulary and dropped when loading",
            name,
            split,
            n_outside,
            n_genes,
        )


class BatchPlan:
    """Global batches of cell ids, epoch after epoch, from seeded permutations.

    With `within_dataset`, every batch holds cells of one species and, as far as the cells
    allow, of one dataset (scConcept's batches hold one dataset): each dataset is cut into full
    batches, and the remainders of a species' datasets are pooled and cut into further batches
    of that species, so a dataset smaller than a batch is still trained on. Without it, batches
    mix the whole split. Each epoch leaves out a different random rest of fewer than a batch per
    pool, so every cell is reached; only a species with fewer cells than one global batch, or
    a dataset smaller than one batch whose species' pooled remainders never fill a batch, is
    never trained on (each logged as a warning every epoch). With `length_grouped`, cells of
    similar length share a batch: each run of `LENGTH_WINDOW` shuffled batches is sorted by cell
    length before it is cut into batches, and the batches are shuffled again, so padding shrinks
    while every epoch still visits each cell at most once in random batches.
    With `drop_last=False` (validation) each dataset's last, smaller batch is kept instead of
    pooled, so every cell is evaluated; it must hold at least `min_cells` cells.

    `dataset_alpha` < 1 rebalances datasets: an epoch of about N cells draws `dataset_targets`,
    i.e. N x n_d^alpha / sum_e n_e^alpha cells of dataset d (rounded), the multinomial language
    sampling of Conneau & Lample 2019 (XLM, alpha 0.5) over datasets. A dataset below its
    target repeats its cells in fresh permutations, one above it contributes a different random
    subset each epoch; alpha 1 keeps every cell once per epoch, alpha 0 gives every dataset the
    same share. With `within_dataset`, every full batch is cut from one permutation, so no
    batch holds a cell twice (its copies would get the same views and be each other's
    negatives); a dataset smaller than a batch is therefore not repeated. Without it, the
    datasets' draws are interleaved at random, and a cell may rarely share a batch with its
    copy. Not combined with `length_grouped` (sorting by length would put copies together).
    """

    LENGTH_WINDOW = 64

    def __init__(
        self,
        data: SplitData,
        global_batch: int,
        *,
        seed: int,
        within_dataset: bool = False,
        length_grouped: bool = False,
        drop_last: bool = True,
        min_cells: int = 1,
        dataset_alpha: float = 1.0,
    ) -> None:
        if not 0 <= dataset_alpha <= 1:
            raise ValueError(f"dataset_alpha must lie in [0, 1], not {dataset_alpha}")
        if dataset_alpha < 1 and length_grouped:
            raise ValueError("dataset_alpha < 1 cannot be combined with length_grouped")
        self.data = data
        self.global_batch = global_batch
        self.seed = seed
        self.within_dataset = within_dataset
        self.dataset_alpha = dataset_alpha
        self.drop_last, self.min_cells = drop_last, min_cells
        self.lengths = data.collection.cell_lengths() if length_grouped else None
        ranges = data.collection.shard_ranges()
        groups: dict[int, list[np.ndarray]] = {}
        species: dict[int, str] = {}
        by_dataset: dict[int, list[tuple[int, int]]] = {}  # cell ranges of each dataset
        for (start, stop), dataset, shard_species in zip(
            ranges, data.datasets, data.species, strict=True
        ):
            key = int(dataset) if within_dataset else 0
            groups.setdefault(key, []).append(np.arange(start, stop))
            species[key] = str(shard_species) if within_dataset else ""
            by_dataset.setdefault(int(dataset), []).append((start, stop))
        keys = sorted(groups)
        self.groups = [np.concatenate(groups[k]) for k in keys]
        self.group_species = [species[k] for k in keys]
        datasets = sorted(by_dataset)
        sizes = [sum(stop - start for start, stop in by_dataset[d]) for d in datasets]
        # The cells of each dataset, which rebalancing draws from: one-dataset groups already
        # are; a mixed split needs them only when it is rebalanced.
        if within_dataset:
            self.dataset_cells = self.groups
        elif dataset_alpha < 1:
            self.dataset_cells = [
                np.concatenate([np.arange(start, stop) for start, stop in by_dataset[d]])
                for d in datasets
            ]
        else:
            self.dataset_cells = []
        self.dataset_targets = dataset_targets(sizes, dataset_alpha)
        if within_dataset:  # one-dataset batches repeat no cell: small datasets are not repeated
            self.dataset_targets = [
                t if n >= global_batch else min(t, n)
                for t, n in zip(self.dataset_targets, sizes, strict=True)
            ]
        # Cells a group holds per epoch (with rebalancing, its datasets' targets).
        self.group_sizes = (
            [len(g) for g in self.groups]
            if dataset_alpha == 1
            else self.dataset_targets
            if within_dataset
            else [sum(self.dataset_targets)]
        )
        self.pools = sorted(set(self.group_species)) if within_dataset and drop_last else []
        self.dataset_of_cell = np.repeat(
            np.asarray(data.datasets, dtype=np.int64), [b - a for a, b in ranges]
        )
        pooled = {
            pool: sum(
                n % global_batch
                for n, s in zip(self.group_sizes, self.group_species, strict=True)
                if s == pool
            )
            for pool in self.pools
        }
        self.batches_per_epoch = sum(self._n_batches(n) for n in self.group_sizes) + sum(
            n // global_batch for n in pooled.values()
        )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no batch of {global_batch} cells fits: the largest group has "
                f"{max(self.group_sizes)} cells"
            )
        self.unreachable = {}
        for pool in self.pools:
            total = sum(
                n for n, s in zip(self.group_sizes, self.group_species, strict=True) if s == pool
            )
            if total < global_batch:
                self.unreachable[pool] = total
        # A dataset smaller than a batch lives only in its species' pooled rests; when these
        # never fill one batch, it is never trained on, though its species is.
        self.untrained = {
            data.dataset_name(key): n
            for key, n, pool in zip(keys, self.group_sizes, self.group_species, strict=True)
            if pool in self.pools  # one-dataset batches, pooled rests
            and pool not in self.unreachable
            and 0 < n < global_batch
            and pooled[pool] < global_batch
        }
        self._epoch: int | None = None
        self._plan: list[np.ndarray] = []

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, "batches", epoch))
            batches: list[np.ndarray] = []
            rests: dict[str, list[np.ndarray]] = {pool: [] for pool in self.pools}
            for group, species in zip(self._epoch_groups(rng), self.group_species, strict=True):
                # Rebalanced groups come drawn in a random order, cut into batches as they are.
                order = rng.permutation(group) if self.dataset_alpha == 1 else group
                n = self._n_batches(len(order))
                batches += self._cut(order, n)
                if self.pools:
                    rests[species].append(order[n * self.global_batch :])
            for pool in self.pools:
                order = rng.permutation(np.concatenate(rests[pool]))
                batches += self._cut(order, len(order) // self.global_batch)
            self._plan = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = epoch
        return self._plan

    def _epoch_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The cells each group draws its batches from this epoch (with `dataset_alpha` < 1,
        each dataset's cells repeated or subsampled to its target)."""
        if self.dataset_alpha == 1:
            return self.groups
        pairs = zip(self.dataset_cells, self.dataset_targets, strict=True)
        if self.within_dataset:
            return [_batch_stream(cells, target, self.global_batch, rng) for cells, target in pairs]
        drawn = [_permutations(cells, target, rng) for cells, target in pairs]
        # Interleave the datasets' draws at random, each in its own order.
        which = rng.permutation(np.repeat(np.arange(len(drawn)), [len(d) for d in drawn]))
        mixed = np.empty(len(which), dtype=np.int64)
        mixed[np.argsort(which, kind="stable")] = np.concatenate(drawn)
        return [mixed]

    def _cut(self, order: np.ndarray, n: int) -> list[np.ndarray]:
        """`n` batches from the front of `order` (length-sorted in windows when grouping)."""
        if self.lengths is not None:
            window = self.global_batch * self.LENGTH_WINDOW
            order = np.concatenate(
                [
                    chunk[np.argsort(self.lengths[chunk], kind="stable")]
                    for chunk in np.split(order, range(window, len(order), window))
                ]
            )
        return [order[i * self.global_batch : (i + 1) * self.global_batch] for i in range(n)]

    def _n_batches(self, n_cells: int) -> int:
        full, rest = divmod(n_cells, self.global_batch)
        return full + int(not self.drop_last and rest >= self.min_cells)

    def batch(self, k: int) -> np.ndarray:
        """Global batch number k of the run."""
        epoch, position = divmod(k, self.batches_per_epoch)
        return self.epoch_plan(epoch)[position]

    def cells_per_dataset(self, epoch: int) -> dict[str, tuple[int, int]]:
        """Per dataset: (cells in the batches of `epoch`, cells in the split)."""
        cells = np.concatenate(self.epoch_plan(epoch)) if self.batches_per_epoch else []
        n_datasets = len(self.data.dataset_names) or int(self.dataset_of_cell.max()) + 1
        seen = np.bincount(self.dataset_of_cell[cells], minlength=n_datasets)
        total = np.bincount(self.dataset_of_cell, minlength=n_datasets)
        return {
            self.data.dataset_name(i): (int(seen[i]), int(total[i]))
            for i in range(n_datasets)
            if total[i]
        }

    def log_epoch(self, epoch: int) -> None:
        """Log the cells of each dataset that `epoch` trains on."""
        log.info(
            "epoch %d: %d batches of %d cells; cells per dataset: %s",
            epoch,
            self.batches_per_epoch,
            self.global_batch,
            ", ".join(
                f"{name} {seen}/{total}"
                for name, (seen, total) in self.cells_per_dataset(epoch).items()
            ),
        )
        for species, n in self.unreachable.items():
            log.warning(
                "%s: %d training cells, fewer than one global batch of %d: never trained on",
                species,
                n,
                self.global_batch,
            )
        for dataset, n in self.untrained.items():
            log.warning(
                "dataset %s: %d training cells, fewer than one global batch of %d, and its "
                "species' other datasets leave too few spare cells to fill a batch with it: "
                "never trained on",
                dataset,
                n,
                self.global_batch,
            )


def dataset_targets(sizes: Sequence[int], alpha: float) -> list[int]:
    """Cells per epoch of each dataset when an epoch of sum(sizes) cells gives dataset d the
    share n_d^alpha / sum_e n_e^alpha (XLM's multinomial sampling, Conneau & Lample 2019;
    alpha 1: the sizes themselves, alpha 0: equal shares). Every non-empty dataset gets at
    least one cell."""
    if alpha == 1:
        return [int(n) for n in sizes]
    n = np.asarray(sizes, dtype=np.float64)
    weights = np.where(n > 0, n, 0.0) ** alpha * (n > 0)
    targets = np.rint(n.sum() * weights / weights.sum()).astype(np.int64)
    return [int(t) for t in np.where(n > 0, np.maximum(targets, 1), 0)]


def _permutations(cells: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` cells from fresh permutations of `cells`, one after the other (each cell floor or
    ceil of n / len(cells) times); none for a dataset without training cells."""
    if n == 0:
        return cells[:0]
    repeats = -(-n // len(cells))
    return cells[np.argsort(rng.random((repeats, len(cells))), axis=1)].ravel()[:n]


def _batch_stream(cells: np.ndarray, n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """`n` cells of one dataset for one-dataset batches: full batches cut from fresh
    permutations of `cells` (each permutation gives len(cells) // batch of them, so no batch
    holds a cell twice), then the rest (< batch cells, for the species' pooled batches) from
    the last permutation's unused cells where it has enough (so a dataset drawn below its size
    repeats no cell). `n` <= len(cells) when the dataset is smaller than a batch."""
    per_permutation = len(cells) // batch * batch
    if n == 0 or per_permutation == 0:
        return rng.permutation(cells)[:n]
    full, rest = n // batch * batch, n % batch
    k = max(1, -(-full // per_permutation))
    blocks = _permutations(cells, k * len(cells), rng).reshape(k, len(cells))
    kept = blocks[:, :per_permutation].ravel()[:full]
    used = full - (k - 1) * per_permutation  # cells of the last permutation already in batches
    tail = blocks[-1, used:] if len(cells) - used >= rest else rng.permutation(cells)
    return np.concatenate([kept, tail[:rest]])


class PlannedBatches(Sampler):
    """Yields (k, this rank's cells of global batch k, n_padding) for k = start, start+1, ...
    (endless) or for the first `limit` batches (validation).

    Every rank gets the same number of cells, so every collective (the contrastive all-gather
    of embeddings above all) sees equal shapes: a global batch that does not split evenly (a
    last validation batch) is split as evenly as it can be, and each shorter slice is padded
    with copies of its first cell; the last `n_padding` cells of a slice are padding, which
    the collate marks (`cell_mask`) and the losses leave out. With `log_epochs`, the start of
    every epoch is logged with its cells per dataset.
    """

    def __init__(
        self,
        plan: BatchPlan,
        *,
        rank: int,
        world_size: int,
        start: int = 0,
        limit: int | None = None,
        log_epochs: bool = False,
    ) -> None:
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.start, self.limit, self.log_epochs = start, limit, log_epochs
        if plan.global_batch % world_size:
            raise ValueError(
                f"global batch {plan.global_batch} does not split over {world_size} ranks"
            )

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, int]]:
        k = self.start
        epoch = None
        while self.limit is None or k < self.limit:
            if self.log_epochs and k // self.plan.batches_per_epoch != epoch:
                epoch = k // self.plan.batches_per_epoch
                self.plan.log_epoch(epoch)
            parts = np.array_split(self.plan.batch(k), self.world_size)
            mine = parts[self.rank]
            n_padding = len(parts[0]) - len(mine)
            if n_padding:
                mine = np.concatenate([mine, np.repeat(mine[:1], n_padding)])
            yield k, mine, n_padding
            k += 1

    def __len__(self) -> int:
        if self.limit is None:
            raise TypeError("an endless stream of training batches has no length")
        return self.limit - self.start


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed 64-bit hash (arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniforms in [0, 1) that are a pure function of (seed, keys), elementwise (broadcast)."""
    x = np.full(np.broadcast(*[np.asarray(k) for k in keys]).shape, seed, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            x = _mix(x ^ (np.asarray(key).astype(np.uint64) + _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class CellNoise:
    """Randomness of one batch as a function of (seed, batch number, cell, position).

    A cell's draws do not depend on which rank holds it or on the other cells of its batch,
    so a run on N ranks tokenizes and masks every cell exactly as a run on one rank does, and
    a resumed run exactly as an uninterrupted one. Each call of `entries` or `cells` is a new
    stream.
    """

    def __init__(self, seed: int, k: int, cells: np.ndarray) -> None:
        self.seed, self.k, self.cells = seed, k, np.asarray(cells, dtype=np.int64)
        self.stream = 0
        self._layout: tuple[np.ndarray, np.ndarray] | None = None

    def for_rows(self, lengths: np.ndarray) -> CellNoise:
        """Describe the packed layout (entries per cell) that `entries` draws for."""
        lengths = np.asarray(lengths)
        cell = np.repeat(self.cells, lengths)
        position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self._layout = (cell, position)
        return self

    def entries(self, like: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """One uniform per packed entry (see `for_rows`)."""
        if self._layout is None:
            raise RuntimeError("call for_rows(lengths) before drawing per entry")
        self.stream += 1
        cell, position = self._layout
        return torch.from_numpy(hashed_uniform(self.seed, self.k, self.stream, cell, position))

    def cells_uniform(self, like: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """One uniform per cell of the batch."""
        self.stream += 1
        return torch.from_numpy(hashed_uniform(self.seed, self.k, self.stream, self.cells, 0))


class CollatedBatches(Dataset):
    """Map (k, cells, n_padding) to a tokenized batch: gather from the shards, the objective's
    collate, then `cell_mask` (False on padding cells, see `PlannedBatches`)."""

    def __init__(self, data: SplitData, collate: Any, *, seed: int) -> None:
        self.data, self.collate, self.seed = data, collate, seed

    def __getitem__(self, item: tuple[int, np.ndarray, int]) -> dict[str, Any]:
        k, cells, n_padding = item
        batch: SparseBatch = self.data.collection.gather(cells)
        valid = np.ones(len(batch), dtype=bool)
        if n_padding:
            # The padding copies one cell; gather sorts, so mark the last copies of it.
            copies = np.flatnonzero(batch.cells == cells[-1])
            valid[copies[len(copies) - n_padding :]] = False
        out = self.collate(batch, self.data, CellNoise(self.seed, k, batch.cells))
        return mask_cells(out, valid)


def mask_cells(batch: dict[str, Any], valid: np.ndarray) -> dict[str, Any]:
    """Add `cell_mask` [B] (True for real cells) and clear `loss_mask` on padding cells."""
    mask = torch.from_numpy(np.asarray(valid, dtype=bool))
    batch["cell_mask"] = mask
    if "loss_mask" in batch:
        if "cu_seqlens" in batch:
            lengths = torch.diff(batch["cu_seqlens"]).long()
            batch["loss_mask"] = batch["loss_mask"] & torch.repeat_interleave(mask, lengths)
        else:
            batch["loss_mask"] = batch["loss_mask"] & mask[:, None]
    return batch

    def __len__(self) -> int:  # required by Dataset's protocol; batches are addressed by plan
        return self.data.n_cells


class ShardDataModule(L.LightningDataModule):
    """Train and validation loaders over the shard manifest.

    Parameters
    ----------
    manifest
        `manifests/shards.parquet`.
    mappings
        Token mapping of every species.
    collate
        The objective's collate: (SparseBatch, SplitData, numpy Generator) -> dict of tensors.
    batch_size
        Cells per device per step (the global batch is batch_size x world size).
    seed
        Seed of the batch plans and of the collate's randomness.
    within_dataset
        Batches hold one dataset each (contrastive training).
    length_grouped
        Batch cells of similar length together (less padding).
    dataset_alpha
        Training datasets' shares of an epoch, proportional to n_cells^alpha (`BatchPlan`).
    val_batches
        Validation batches per evaluation (a fixed set, the same at every evaluation).
    num_workers
        Loader worker processes (0: load in the training process).
    medians
        Species -> gene summary with `nonzero_median` (rank-ordered tokenization).
    specials
        The model's special tokens (`specials_for` the input layout).
    """

    def __init__(
        self,
        manifest: str | Path,
        mappings: Mapping[str, TokenMapping],
        collate: Any,
        *,
        batch_size: int,
        seed: int,
        within_dataset: bool = False,
        length_grouped: bool = schema_default("train.length_grouped"),
        dataset_alpha: float = schema_default("train.dataset_alpha"),
        val_batches: int = schema_default("train.val_batches"),
        num_workers: int = schema_default("train.num_workers"),
        medians: Mapping[str, pl.DataFrame] | None = None,
        specials: Sequence[str] = SPECIALS,
    ) -> None:
        super().__init__()
        self.manifest, self.mappings, self.collate = Path(manifest), dict(mappings), collate
        self.batch_size, self.seed, self.within_dataset = batch_size, seed, within_dataset
        self.length_grouped, self.dataset_alpha = length_grouped, dataset_alpha
        self.val_batches, self.num_workers, self.medians = val_batches, num_workers, medians
        self.layout = VocabularyLayout.from_mappings(self.mappings, specials=specials)
        self.train: SplitData | None = None
        self.val: SplitData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is None:
            self.train = open_split(
                self.manifest, "train", self.mappings, self.layout, medians=self.medians
            )
            frame = pl.read_parquet(self.manifest)
            if (frame["split"] == "val").any():
                self.val = open_split(
                    self.manifest, "val", self.mappings, self.layout, medians=self.medians
                )
            if self._world()[0] == 0:
                for name, split in (("train", self.train), ("val", self.val)):
                    if split is not None:
                        log_genes_outside_vocabulary(split, name)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        plan = BatchPlan(
            self.train,
            self.batch_size * world,
            seed=self.seed,
            within_dataset=self.within_dataset,
            length_grouped=self.length_grouped,
            dataset_alpha=self.dataset_alpha,
        )
        # Resume where the checkpoint left off: batches consumed = optimizer steps x accumulation.
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        sampler = PlannedBatches(
            plan, rank=rank, world_size=world, start=start, log_epochs=rank == 0
        )
        return self._loader(self.train, sampler, seed=self.seed)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        rank, world = self._world()
        plan = BatchPlan(
            self.val,
            self.batch_size * world,
            seed=derive_seed(self.seed, "val"),
            within_dataset=self.within_dataset,
            drop_last=False,
            min_cells=world,
        )
        sampler = PlannedBatches(
            plan, rank=rank, world_size=world, limit=min(self.val_batches, plan.batches_per_epoch)
        )
        return self._loader(self.val, sampler, seed=derive_seed(self.seed, "val"))

    def _loader(self, data: SplitData, sampler: Sampler, *, seed: int) -> DataLoader:
        return DataLoader(
            CollatedBatches(data, self.collate, seed=seed),
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def n_cells(batch: Mapping[str, Any]) -> int:
    """Real cells in a model batch (either layout; contrastive batches hold two views of them;
    padding cells, see `cell_mask`, do not count)."""
    if "cell_mask" in batch:
        return int(batch["cell_mask"].sum())
    if "a" in batch:
        batch = batch["a"]
    if "cu_seqlens" in batch:
        return int(batch["cu_seqlens"].shape[0] - 1)
    return int(batch["tokens"].shape[0])


def pack(lengths: np.ndarray) -> np.ndarray:
    """cu_seqlens (int32) of cells with the given lengths."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def to_padded(
    flat: Mapping[str, np.ndarray], cu_seqlens: np.ndarray, *, pad: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Right-padded [B, L] tensors from packed arrays; `padding_mask` True where padded."""
    lengths = np.diff(cu_seqlens)
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(int(cu_seqlens[-1])) - np.repeat(cu_seqlens[:-1], lengths)
    out: dict[str, torch.Tensor] = {}
    for name, values in flat.items():
        array = np.full((n, width), pad.get(name, 0), dtype=values.dtype)
        array[rows, cols] = values
        out[name] = torch.from_numpy(array)
    padding = np.ones((n, width), dtype=bool)
    padding[rows, cols] = False
    out["padding_mask"] = torch.from_numpy(padding)
    return out


def as_model_batch(
    flat: Mapping[str, np.ndarray],
    cu_seqlens: np.ndarray,
    *,
    padding_free: bool,
    pad: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """The model's batch in either layout: varlen (`cu_seqlens`, `max_seqlen`) or padded."""
    if padding_free:
        out = {
            name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in flat.items()
        }
        out["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        out["max_seqlen"] = torch.tensor(int(np.diff(cu_seqlens).max()))
        return out
    return to_padded(flat, cu_seqlens, pad=pad)


def select_entries(offsets: np.ndarray, max_per_row: int, keys: np.ndarray | None) -> np.ndarray:
    """Indices of at most `max_per_row` entries of each CSR row: those with the smallest random
    `keys` (one per entry), or the first ones when `keys` is None.

    Returns entry indices grouped by row, in row order, ascending within a row.
    """
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    rank = np.arange(len(rows)) - np.repeat(offsets[:-1], lengths)
    if keys is None:
        return np.flatnonzero(rank < max_per_row)
    order = np.lexsort((keys, rows))
    return np.sort(order[rank < max_per_row])


def global_tokens(batch: SparseBatch, data: SplitData) -> np.ndarray:
    """The batch's tokens in the model's token space (see `VocabularyLayout`): the loader
    already looked them up in it (one lookup per gene list, `loader.TokenSpace`)."""
    return batch.tokens.astype(np.int64)


def read_medians(paths: Sequence[str | Path]) -> dict[str, pl.DataFrame]:
    """Species summaries (`stats/species/<species>.summary.parquet`) keyed by species."""
    return {Path(p).name.split(".")[0]: pl.read_parquet(p) for p in paths}
