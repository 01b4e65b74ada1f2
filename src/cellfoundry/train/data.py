"""Data for training: a multi-species vocabulary layout, batch plans, and the LightningDataModule.

Batches are planned, not drawn: global batch k of a run is a pure function of (seed, k), so a
run resumed from a checkpoint at step s continues with exactly the batches an uninterrupted run
would have seen, and the global batch is the same whatever the number of ranks (each rank takes
its slice). Tokenization (the objective's `collate`) runs in the Dataset, hence in worker
processes when `num_workers > 0`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellfoundry.loader import ShardCollection, SparseBatch
from cellfoundry.seeds import derive_seed
from cellfoundry.vocabulary import CLS, MASK, PAD, TokenMapping

SPECIALS = (CLS, PAD, MASK)


@dataclass(frozen=True)
class VocabularyLayout:
    """One token space for several species: `<cls>` 0, `<pad>` 1, `<mask>` 2, then each species'
    genes in a block of their own (species sorted by name, genes in token order).

    Species' token mappings each start their genes at 3, so the same local id means different
    genes in different species; `local_to_global[species]` maps a species' local ids to model ids.
    """

    species: tuple[str, ...]
    offsets: dict[str, int]
    local_to_global: dict[str, np.ndarray]
    n_tokens: int

    cls_id = 0
    pad_id = 1
    mask_id = 2

    @classmethod
    def from_mappings(cls, mappings: Mapping[str, TokenMapping]) -> VocabularyLayout:
        offsets, tables, start = {}, {}, len(SPECIALS)
        for species in sorted(mappings):
            mapping = mappings[species]
            lut = np.full(mapping.n_tokens, -1, dtype=np.int64)
            for i, name in enumerate(SPECIALS):
                lut[mapping.token_of(name)] = i
            genes = mapping.gene_table["token"].to_numpy()
            lut[np.sort(genes)] = start + np.arange(len(genes))
            offsets[species], tables[species] = start, lut
            start += len(genes)
        return cls(tuple(sorted(mappings)), offsets, tables, start)

    def gene_range(self, species: str) -> tuple[int, int]:
        """[low, high) model ids of a species' genes."""
        low = self.offsets[species]
        return low, low + int((self.local_to_global[species] >= len(SPECIALS)).sum())

    def to_dict(self) -> dict[str, Any]:
        return {"species": list(self.species), "offsets": self.offsets, "n_tokens": self.n_tokens}


@dataclass(frozen=True)
class SplitData:
    """The shards of one split with what tokenization needs."""

    collection: ShardCollection
    layout: VocabularyLayout
    datasets: np.ndarray  # dataset index of each shard
    species: np.ndarray  # species name of each shard

    @property
    def n_cells(self) -> int:
        return len(self.collection)


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
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return SplitData(
        collection,
        layout,
        np.array([index[n] for n in names]),
        np.array(frame["species"].to_list(), dtype=object),
    )


class BatchPlan:
    """Global batches of cell ids, epoch after epoch, from seeded permutations.

    With `within_dataset`, every batch holds cells of one dataset (scConcept's batches hold one
    dataset, hence one species); otherwise batches mix the whole split. With `length_grouped`,
    cells of similar length share a batch: each run of `LENGTH_WINDOW` shuffled batches is
    sorted by cell length before it is cut into batches, and the batches are shuffled again,
    so padding shrinks while every epoch still visits every cell once in random batches.
    With `drop_last=False` (validation) a group's last, smaller batch is kept, so a split
    smaller than one batch still gets evaluated; it must hold at least `min_cells` cells.
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
    ) -> None:
        self.global_batch = global_batch
        self.seed = seed
        self.within_dataset = within_dataset
        self.drop_last, self.min_cells = drop_last, min_cells
        self.lengths = data.collection.cell_lengths() if length_grouped else None
        ranges = data.collection.shard_ranges()
        groups: dict[int, list[np.ndarray]] = {}
        for (start, stop), dataset in zip(ranges, data.datasets, strict=True):
            groups.setdefault(int(dataset) if within_dataset else 0, []).append(
                np.arange(start, stop)
            )
        self.groups = [np.concatenate(groups[k]) for k in sorted(groups)]
        self.batches_per_epoch = sum(self._n_batches(len(g)) for g in self.groups)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no batch of {global_batch} cells fits: the largest group has {max(len(g) for g in self.groups)} cells"
            )
        self._epoch: int | None = None
        self._plan: list[np.ndarray] = []

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, "batches", epoch))
            batches = []
            for group in self.groups:
                order = rng.permutation(group)
                n = self._n_batches(len(order))
                if self.lengths is not None:
                    window = self.global_batch * self.LENGTH_WINDOW
                    order = np.concatenate(
                        [
                            chunk[np.argsort(self.lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(window, len(order), window))
                        ]
                    )
                batches += [
                    order[i * self.global_batch : (i + 1) * self.global_batch] for i in range(n)
                ]
            self._plan = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = epoch
        return self._plan

    def _n_batches(self, n_cells: int) -> int:
        full, rest = divmod(n_cells, self.global_batch)
        return full + int(not self.drop_last and rest >= self.min_cells)

    def batch(self, k: int) -> np.ndarray:
        """Global batch number k of the run."""
        epoch, position = divmod(k, self.batches_per_epoch)
        return self.epoch_plan(epoch)[position]


class PlannedBatches(Sampler):
    """Yields (k, this rank's cells of global batch k) for k = start, start+1, ... (endless) or
    for the first `limit` batches (validation)."""

    def __init__(
        self,
        plan: BatchPlan,
        *,
        rank: int,
        world_size: int,
        start: int = 0,
        limit: int | None = None,
    ) -> None:
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.start, self.limit = start, limit
        if plan.global_batch % world_size:
            raise ValueError(
                f"global batch {plan.global_batch} does not split over {world_size} ranks"
            )

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        k = self.start
        while self.limit is None or k < self.limit:
            cells = self.plan.batch(k)
            # Equal slices for full batches; a last validation batch splits as evenly as it can.
            yield k, np.array_split(cells, self.world_size)[self.rank]
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
    """Map (k, cells) to a tokenized batch: gather from the shards, then the objective's collate."""

    def __init__(self, data: SplitData, collate: Any, *, seed: int) -> None:
        self.data, self.collate, self.seed = data, collate, seed

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        k, cells = item
        batch: SparseBatch = self.data.collection.gather(cells)
        return self.collate(batch, self.data, CellNoise(self.seed, k, batch.cells))

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
    val_batches
        Validation batches per evaluation (a fixed set, the same at every evaluation).
    num_workers
        Loader worker processes (0: load in the training process).
    medians
        Species -> gene summary with `nonzero_median` (rank-ordered tokenization).
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
        length_grouped: bool = False,
        val_batches: int = 20,
        num_workers: int = 0,
        medians: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        super().__init__()
        self.manifest, self.mappings, self.collate = Path(manifest), dict(mappings), collate
        self.batch_size, self.seed, self.within_dataset = batch_size, seed, within_dataset
        self.length_grouped = length_grouped
        self.val_batches, self.num_workers, self.medians = val_batches, num_workers, medians
        self.layout = VocabularyLayout.from_mappings(self.mappings)
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
        )
        # Resume where the checkpoint left off: batches consumed = optimizer steps x accumulation.
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        sampler = PlannedBatches(plan, rank=rank, world_size=world, start=start)
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
    """Cells in a model batch (either layout; contrastive batches hold two views of them)."""
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
