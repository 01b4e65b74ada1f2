"""Random batches of cells from many memory-mapped shards, tokenized as they load.

`ShardCollection` addresses the cells of many shards (the rows of a split in the shard
manifest, each a whole shard or a part of it) by one global index and serves a batch with ONE
compiled gather: the batch's cells are sorted, each cell's entries are copied from its shard,
the shard's gene positions become token ids through a lookup built once per gene list, and
genes outside the vocabulary are dropped. Batches stay sparse (flat arrays plus row offsets)
until the model's collate pads or packs them. A batch is written into a block of memory kept
from earlier batches once none of their arrays is alive (`OutputBuffers`): a new block per
batch would be page-faulted in by the kernel every time, which costs more than the copy.

Scale: nothing is opened at start-up. A shard is mapped into memory the first time one of its
cells is asked for, with the file descriptor closed right after mapping (`map_npy`), so ten
thousand shards need no open files (`ulimit -n` does not matter) and two memory maps each
(`vm.max_map_count`, 65,530 by default, allows ~30,000 shards per process). Start-up reads only
the manifest; memory grows with the shards touched (their per-cell offsets), not with their
number.

Rank order (Geneformer) needs the species' corpus medians, which change when datasets are
added; the loader applies them at read time (`rank_batch`), so shards never need rewriting.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import io
import mmap
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import polars as pl
from numba.typed import List as TypedList

from cellfoundry.discretize import rank_order
from cellfoundry.io import read_json
from cellfoundry.shards import ENTRY, genes_sha256
from cellfoundry.vocabulary import TokenMapping


@dataclass
class SparseBatch:
    """Cells as flat arrays with row offsets (CSR), in token space."""

    cells: np.ndarray  # int64 [B], global cell ids in the collection (sorted)
    offsets: np.ndarray  # int64 [B + 1]
    tokens: np.ndarray  # int32 [nnz], token ids of the collection's token space
    counts: np.ndarray  # int32 [nnz], raw counts
    bins: np.ndarray  # uint8 [nnz], quantile bins
    shard: np.ndarray  # int32 [B], row (shard) of each cell in the collection
    total_counts: np.ndarray | None = None  # float64 [B], when the collection has medians

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# --- memory maps without file descriptors -------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """Pages mapped with libc's `mmap`, seen by numpy as read-only bytes; unmapped when the last
    array made from them is garbage collected."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, address: int, size: int) -> None:
        self.__array_interface__ = {
            "data": (address, True),
            "shape": (size,),
            "typestr": "|u1",
            "version": 3,
        }
        weakref.finalize(self, _libc.munmap, address, size)


def map_npy(path: str | Path) -> np.ndarray:
    """A read-only memory map of a `.npy` file that holds no file descriptor.

    `numpy.load(mmap_mode='r')` keeps a descriptor open per array (Python's mmap duplicates
    it); this maps with libc's `mmap`, closes the descriptor and unmaps when the array (and every
    view of it) is garbage collected.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        shape, fortran, dtype, offset = _npy_header(fd, path)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            error = ctypes.get_errno()
            raise OSError(error, f"mmap {path}: {os.strerror(error)}")
    finally:
        os.close(fd)
    # The pages are mapped PROT_READ: the array is read-only (a write would crash the process).
    raw = np.asarray(_Mapping(address, size))[offset : offset + nbytes]
    return raw.view(dtype).reshape(shape)


# The header dictionary as numpy (and `shards.NpyAppender`) write it; anything else is read
# by numpy's own parser.
_NPY_DICT = re.compile(
    r"\{'descr': (?P<descr>.+), 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>[0-9, ]*)\),? ?\}\s*",
    re.DOTALL,
)


@functools.lru_cache(maxsize=256)
def _descr_dtype(descr: str) -> np.dtype:
    return np.lib.format.descr_to_dtype(ast.literal_eval(descr))


def _npy_header(fd: int, path: str | Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an open `.npy` file.

    Mapping ten thousand shards parses thirty thousand headers: the shape is read with a
    regular expression and each distinct dtype is parsed once (numpy's own reader spends
    ~100 us per header in `ast.literal_eval`); headers of another form go to numpy's reader.
    """
    head = os.pread(fd, 4096, 0)
    handle = io.BytesIO(head)
    major, _ = np.lib.format.read_magic(handle)
    width = 2 if major == 1 else 4
    length = int.from_bytes(handle.read(width), "little")
    start = handle.tell()
    match = None
    if start + length <= len(head):
        text = head[start : start + length].decode("latin1" if major < 3 else "utf8")
        match = _NPY_DICT.fullmatch(text)
    if match is not None:
        shape = tuple(int(n) for n in match["shape"].split(",") if n.strip())
        return shape, match["fortran"] == "True", _descr_dtype(match["descr"]), start + length
    with open(path, "rb") as file:
        major, _ = np.lib.format.read_magic(file)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(file)
        return shape, fortran, dtype, file.tell()


# --- token lookups ------------------------------------------------------------------------


class TokenSpace:
    """Token ids of genes, per species, and the vocabulary's size.

    The default space is each species' own token mapping (`TokenMapping`); a multi-species
    model passes `to_model`, per species an array mapping the species' token ids to the
    model's (`vocabulary.VocabularyLayout.local_to_global`).
    """

    def __init__(
        self,
        mappings: Mapping[str, TokenMapping],
        to_model: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.mappings = dict(mappings)
        for mapping in self.mappings.values():
            mapping.index  # noqa: B018 - built now, before any DataLoader worker is forked
        self.to_model = dict(to_model) if to_model is not None else None
        if self.to_model is None:
            self.n_tokens = max((m.n_tokens for m in self.mappings.values()), default=0)
        else:
            self.n_tokens = int(max((int(a.max()) + 1 for a in self.to_model.values()), default=0))

    def lookup(self, species: str, gene_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """int32 token id of each gene, -1 for genes outside the vocabulary."""
        local = self.mappings[species].tokens(gene_ids)
        if self.to_model is None:
            return local
        out = np.full(len(local), -1, dtype=np.int32)
        inside = local >= 0
        out[inside] = self.to_model[species][local[inside]]
        return out

    def per_token(self, values: Mapping[str, pl.DataFrame], column: str) -> np.ndarray:
        """One float64 per token of this space from per-species gene tables (`gene_id`,
        `column`); 0 for special tokens and genes without a value."""
        out = np.zeros(self.n_tokens, dtype=np.float64)
        for species, table in values.items():
            if species not in self.mappings:
                continue
            table = table.filter(pl.col(column).is_not_null() & (pl.col(column) > 0))
            tokens = self.lookup(species, table["gene_id"].to_numpy())
            inside = tokens >= 0
            out[tokens[inside]] = table[column].to_numpy()[inside]
        return out


# --- the collection -----------------------------------------------------------------------


@dataclass
class _Row:
    path: Path
    species: str
    dataset: str
    n_cells: int
    genes_key: str
    cells: str = "all"  # all | holdout | rest
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class ShardCollection:
    """Many shards (or parts of them) addressed by one global cell index.

    Parameters
    ----------
    shards
        Shard folders, in a fixed order; or a shard manifest table (`shards.shard_manifest`,
        one split's rows) whose `cells`/`holdout` columns select part of a shard.
    token_mappings
        Token mapping of every species present.
    medians
        Per species, a table with `gene_id` and `nonzero_median` (`gene_stats.summarize`),
        needed only for rank order.
    to_model
        Per species, species token id -> model token id (a multi-species vocabulary layout).
    """

    def __init__(
        self,
        shards: Sequence[str | Path] | pl.DataFrame,
        token_mappings: Mapping[str, TokenMapping],
        *,
        medians: Mapping[str, pl.DataFrame] | None = None,
        to_model: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.rows = _rows(shards)
        self.space = TokenSpace(token_mappings, to_model)
        self.token_mappings = self.space.mappings
        sizes = np.array([r.n_cells for r in self.rows], dtype=np.int64)
        self.cell_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.species_of_row = np.array([r.species for r in self.rows], dtype=object)
        self.dataset_of_row = np.array([r.dataset for r in self.rows], dtype=object)
        # Rows whose cells are a part of their shard: flat holdout arrays with offsets.
        self._select_mode = np.array(
            [{"all": 0, "holdout": 1, "rest": 2}[r.cells] for r in self.rows], dtype=np.int8
        )
        self._held_offsets = np.concatenate(
            [[0], np.cumsum([len(r.holdout) for r in self.rows])]
        ).astype(np.int64)
        self._held = (
            np.concatenate([r.holdout for r in self.rows]) if self.rows else np.zeros(0, np.int64)
        )
        self._held_shifted = self._held - (
            np.arange(len(self._held))
            - np.repeat(self._held_offsets[:-1], np.diff(self._held_offsets))
        )
        self._all_cells = not self._select_mode.any()
        self._median = self.space.per_token(medians, "nonzero_median") if medians else None
        self._luts: dict[tuple[str, str], np.ndarray] = {}
        self._mapped: set[int] = set()
        self._reset_maps()

    def _reset_maps(self) -> None:
        # Typed lists with a read-only placeholder per row (mapped arrays are read-only).
        self._indptr = _placeholders(np.zeros(1, dtype=np.int64), len(self.rows))
        self._entries = _placeholders(np.zeros(0, dtype=ENTRY), len(self.rows))
        self._lut = _placeholders(np.zeros(0, dtype=np.int32), len(self.rows))
        self._total = _placeholders(np.zeros(0, dtype=np.float64), len(self.rows))
        self._mapped = set()
        self._is_mapped = np.zeros(len(self.rows), dtype=bool)  # the same, for a batch at once
        self._buffers = OutputBuffers()

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes started by spawn map shards again on first use.
        state = self.__dict__.copy()
        for key in ("_indptr", "_entries", "_lut", "_total", "_mapped", "_is_mapped", "_buffers"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_maps()

    def __len__(self) -> int:
        return int(self.cell_offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.rows)

    def _open(self, row: int) -> None:
        """Map a shard and build (or reuse) its gene list's token lookup."""
        info = self.rows[row]
        self._indptr[row] = map_npy(info.path / "indptr.npy")
        self._entries[row] = map_npy(info.path / "entries.npy")
        if self._median is not None:  # only rank order needs each cell's total count
            self._total[row] = map_npy(info.path / "total_counts.npy")
        key = (info.species, info.genes_key)
        if key not in self._luts:
            gene_ids = _gene_ids(info.path)
            lut = self.space.lookup(info.species, gene_ids)
            lut.flags.writeable = False
            self._luts[key] = lut
        self._lut[row] = self._luts[key]
        self._mapped.add(row)
        self._is_mapped[row] = True

    def _open_rows(self, rows: np.ndarray) -> None:
        """Map the shards of `rows` not mapped yet."""
        missing = rows[~self._is_mapped[rows]]
        for r in np.unique(missing).tolist():
            self._open(r)

    def lookup(self, row: int) -> np.ndarray:
        """Token id of each gene of a row's shard (-1: outside the vocabulary)."""
        if row not in self._mapped:
            self._open(row)
        return self._lut[row]

    def shard_of(self, cells: np.ndarray) -> np.ndarray:
        """Row (shard) of each global cell id."""
        return (np.searchsorted(self.cell_offsets, cells, side="right") - 1).astype(np.int32)

    def local_cells(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cell index within each shard of the `positions`-th cell of each row."""
        local = np.asarray(positions, dtype=np.int64).copy()
        if self._all_cells:
            return local
        mode = self._select_mode[rows]
        for r in np.unique(rows[mode != 0]):
            chosen = rows == r
            lo, hi = self._held_offsets[r], self._held_offsets[r + 1]
            if self._select_mode[r] == 1:
                local[chosen] = self._held[lo:hi][positions[chosen]]
            else:  # the i-th cell not held out: i plus the held-out cells before it
                local[chosen] = positions[chosen] + np.searchsorted(
                    self._held_shifted[lo:hi], positions[chosen], side="right"
                )
        return local

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each row's cells in the global index."""
        return [
            (int(a), int(b))
            for a, b in zip(self.cell_offsets[:-1], self.cell_offsets[1:], strict=True)
        ]

    def cell_lengths(self, cells: np.ndarray | None = None) -> np.ndarray:
        """Expressed genes per cell (before vocabulary filtering), for `cells` (global ids) or
        all cells (this maps every shard: prefer passing the cells needed)."""
        cells = np.arange(len(self)) if cells is None else np.asarray(cells, dtype=np.int64)
        rows = self.shard_of(cells)
        local = self.local_cells(rows, cells - self.cell_offsets[rows])
        self._open_rows(rows)
        return _lengths(self._indptr, rows, local)

    def total_counts(self, cells: np.ndarray) -> np.ndarray:
        """Each cell's total count (the normalization's denominator), for global cell ids."""
        cells = np.asarray(cells, dtype=np.int64)
        rows = self.shard_of(cells)
        local = self.local_cells(rows, cells - self.cell_offsets[rows])
        out = np.empty(len(cells), dtype=np.float64)
        for r in np.unique(rows):
            chosen = rows == r
            out[chosen] = map_npy(self.rows[r].path / "total_counts.npy")[local[chosen]]
        return out

    def gather(self, cells: np.ndarray) -> SparseBatch:
        """The cells, sorted, with genes as token ids (genes outside the vocabulary dropped).

        The batch's arrays share one block of memory that later batches reuse once none of
        them is referenced any more (`OutputBuffers`); copy what must outlive that.
        """
        cells = np.sort(np.asarray(cells, dtype=np.int64))
        if cells.size and (cells[0] < 0 or cells[-1] >= len(self)):
            raise IndexError(f"cell ids must lie in [0, {len(self)})")
        rows = self.shard_of(cells)
        self._open_rows(rows)
        local = self.local_cells(rows, cells - self.cell_offsets[rows])
        if not cells.size:
            empty = np.zeros(0, dtype=np.int32)
            return SparseBatch(
                cells, np.zeros(1, np.int64), empty, empty, empty.astype(np.uint8), rows
            )
        starts, stops, total = _spans(self._indptr, rows, local)
        n = len(cells)
        # One block: offsets (int64), tokens and counts (int32), totals (float64), bins (uint8).
        with_totals = self._median is not None
        n_totals = n if with_totals else 0
        sizes = (8 * (n + 1), 4 * total, 4 * total, 8 * n_totals, total)
        bounds = np.cumsum((0, *((size + 7) // 8 * 8 for size in sizes)))
        with self._buffers.lock:
            block = self._buffers.take(int(bounds[-1]))
            offsets, tokens, counts, totals, bins = (
                block[lo : lo + size].view(dtype)
                for lo, size, dtype in zip(
                    bounds[:-1].tolist(),
                    sizes,
                    (np.int64, np.int32, np.int32, np.float64, np.uint8),
                    strict=True,
                )
            )
            del block
        k = _gather(
            self._entries,
            self._lut,
            self._total,
            rows,
            local,
            starts,
            stops,
            with_totals,
            offsets,
            tokens,
            counts,
            bins,
            totals,
        )
        return SparseBatch(
            cells,
            offsets,
            tokens[:k],
            counts[:k],
            bins[:k],
            rows,
            totals if with_totals else None,
        )

    def genes_outside_vocabulary(self) -> dict[str, tuple[int, int]]:
        """Per dataset: (genes of its shards outside the vocabulary, genes), over the union of
        its shards' gene lists. The loader drops those genes as cells load. Reads each
        distinct gene list once (not at start-up: call it to log the counts)."""
        outside: dict[str, set[str]] = {}
        every: dict[str, set[str]] = {}
        lists: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
        for row, info in enumerate(self.rows):
            key = (info.species, info.genes_key)
            if key not in lists:
                genes = _gene_ids(info.path).astype(str)
                lut = self.lookup(row)
                lists[key] = (set(genes.tolist()), set(genes[lut < 0].tolist()))
            genes, dropped = lists[key]
            every.setdefault(info.dataset, set()).update(genes)
            outside.setdefault(info.dataset, set()).update(dropped)
        return {name: (len(outside[name]), len(every[name])) for name in sorted(every)}

    def gene_medians(self, tokens: np.ndarray) -> np.ndarray:
        """Non-zero corpus median of each token (collection token space); 0 where unknown."""
        if self._median is None:
            raise ValueError("gene medians need corpus medians: pass medians= to ShardCollection")
        return self._median[tokens]

    def rank_batch(
        self, batch: SparseBatch, *, max_len: int, target_sum: float = 10_000.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Geneformer rank order of a gathered batch: (offsets, tokens), top `max_len` per cell.

        Each gene's value is count / cell total x target_sum / the gene's non-zero median over
        its species' corpus (Theodoris et al. 2023, in that floating-point order); genes
        without a median are not ranked. Tokens are sorted by value, descending; equal values
        by ascending token id (a documented, deterministic rule where Geneformer's
        `np.argsort(-x)` leaves ties to its unstable sort).
        """
        if self._median is None:
            raise ValueError("rank order needs corpus medians: pass medians= to ShardCollection")
        totals = (
            batch.total_counts if batch.total_counts is not None else self.total_counts(batch.cells)
        )
        offsets, ranked = rank_order(
            batch.offsets,
            batch.tokens,
            batch.counts,
            totals,
            self._median,
            max_len,
            target_sum,
        )
        return offsets, ranked


def _gene_ids(shard: Path) -> np.ndarray:
    """A shard's gene IDs. Read with pyarrow on the calling thread: this runs in DataLoader
    workers forked from the training process, where polars' thread pool would deadlock."""
    import pyarrow.parquet as pq

    table = pq.read_table(shard / "var.parquet", columns=["gene_id"], use_threads=False)
    return np.asarray(table.column("gene_id").to_pylist(), dtype=object)


def _placeholders(array: np.ndarray, n: int) -> TypedList:
    array.flags.writeable = False
    out = TypedList()
    for _ in range(max(n, 1)):
        out.append(array)
    return out


def _rows(shards: Sequence[str | Path] | pl.DataFrame) -> list[_Row]:
    if isinstance(shards, pl.DataFrame):
        rows = []
        for record in shards.iter_rows(named=True):
            held = record.get("holdout")
            rows.append(
                _Row(
                    Path(record["shard"]),
                    record["species"],
                    record["dataset"],
                    int(record["n_cells"]),
                    record["genes_sha256"],
                    record.get("cells") or "all",
                    np.asarray(held if held is not None else [], dtype=np.int64),
                )
            )
        return rows
    out = []
    for path in map(Path, shards):
        info = read_json(path / "shard.json")
        key = info.get("genes_sha256") or genes_sha256(
            pl.read_parquet(path / "var.parquet", columns=["gene_id"])["gene_id"].to_list()
        )
        out.append(_Row(path, info["species"], info["dataset"], int(info["n_cells"]), key))
    return out


@numba.njit(cache=True, nogil=True)
def _lengths(indptr, rows, local):  # pragma: no cover - compiled
    out = np.empty(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        p = indptr[rows[i]]
        out[i] = p[local[i] + 1] - p[local[i]]
    return out


@numba.njit(cache=True, nogil=True)
def _spans(indptr, rows, local):  # pragma: no cover - compiled
    """[start, stop) of each cell's entries in its shard, and the entries of all cells."""
    starts = np.empty(rows.shape[0], dtype=np.int64)
    stops = np.empty(rows.shape[0], dtype=np.int64)
    total = 0
    for i in range(rows.shape[0]):
        p = indptr[rows[i]]
        starts[i] = p[local[i]]
        stops[i] = p[local[i] + 1]
        total += stops[i] - starts[i]
    return starts, stops, total


@numba.njit(cache=True, nogil=True)
def _gather(
    entries,
    luts,
    totals,
    rows,
    local,
    starts,
    stops,
    with_totals,
    offsets,
    tokens,
    counts,
    bins,
    cell_totals,
):  # pragma: no cover - compiled
    """Copy the cells' entries into the outputs, genes as tokens; returns the entries kept.

    Indices are unsigned (numba adds a negative-index branch to every signed one) and an entry
    outside the vocabulary is written and then overwritten by the next (no branch per entry):
    together ~15% faster than the plain loop. The spans come from `_spans`: reading each
    shard's `indptr` once per batch saves ~10% at 10,000 shards (each cell's offsets lie in
    another file's pages).
    """
    k = np.uint64(0)
    offsets[0] = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        records = entries[r]
        lut = luts[r]
        if with_totals:
            cell_totals[i] = totals[r][local[i]]
        first = np.uint64(starts[i])
        for j in range(np.uint64(stops[i]) - first):
            record = records[first + np.uint64(j)]
            token = lut[np.uint32(record.gene)]
            tokens[k] = token
            counts[k] = record.count
            bins[k] = record.bin
            k += np.uint64(token >= 0)
        offsets[i + 1] = k
    return k


class OutputBuffers:
    """Blocks of memory for gathered batches, each handed out again once no array made from it
    is alive.

    A batch of 256 cells with ~2,000 genes each is ~4.6 MB of output. glibc returns a freed
    block that large to the kernel (its mmap threshold and heap trimming), so a fresh block per
    batch is page-faulted back in, page by page, on every batch: measured in
    `benchmarks/bench_loader.py`, more than half of the gather's time. A block is reused only
    when its reference count shows that the pool holds the last reference (every numpy view of
    a block keeps a reference to it, as do tensors made with `torch.from_numpy`), so an array a
    caller still holds is never overwritten. At most `keep` blocks and `max_bytes` in all are
    kept (a larger batch gets memory of its own); a block is `slack` times the size asked for,
    so batches of slightly different sizes share it.
    """

    def __init__(self, keep: int = 4, max_bytes: int = 256 << 20, slack: float = 1.25) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.slack = slack
        self.blocks: list[np.ndarray] = []
        self.lock = threading.Lock()  # hold it until the block is referenced by its views

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 block of at least `nbytes` that nothing else references."""
        free = None
        for i in range(len(self.blocks)):
            block = self.blocks[i]
            # References: the list, `block` and getrefcount's argument (not `enumerate`, whose
            # reused result tuple would hold one more).
            if sys.getrefcount(block) == 3:
                if block.nbytes >= nbytes:
                    return block
                free = i
        block = np.empty(max(int(nbytes * self.slack), 1), dtype=np.uint8)
        kept = sum(b.nbytes for b in self.blocks)
        if free is not None:  # too small: replaced by the larger one
            if kept - self.blocks[free].nbytes + block.nbytes <= self.max_bytes:
                self.blocks[free] = block
        elif len(self.blocks) < self.keep and kept + block.nbytes <= self.max_bytes:
            self.blocks.append(block)
        return block


def random_batches(
    n_cells: int, batch_size: int, *, seed: int, epoch: int = 0, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Batches of a seeded random permutation of the cells (one epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_cells)
    stop = (n_cells // batch_size) * batch_size if drop_last else n_cells
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def open_manifest(manifest: str | Path, split: str) -> pl.DataFrame:
    """The rows of one split of a shard manifest (`manifests/shards.parquet`)."""
    return pl.read_parquet(manifest).filter(pl.col("split") == split)
