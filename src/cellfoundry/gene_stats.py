"""Per-gene statistics: accumulated while a file streams, merged per dataset and per species.

Corpus-level quantities (which genes are detected, highly variable genes, Geneformer's non-zero
medians) must not be written into per-file outputs, or adding a dataset would reprocess all
others. Each file instead writes mergeable statistics keyed by Ensembl ID, and one job per
dataset and one per species add them up:

- `n_obs`: cells of the files that measured the gene (zeros count for means),
- `n_cells`: cells with a non-zero count,
- `sum`, `sum_sq`: of the normalized value `count / total_counts * target_sum` (the value
  Geneformer's tokenizer divides by the gene's median),
- the distribution of the non-zero normalized values, kept in three tiers as a gene is seen
  in more cells:

  1. up to `exact_max_cells` cells (default 1,000): the values themselves (`values`): the
     median of a rarely seen gene is exact;
  2. up to `quantized_max_cells` (default 10,000): each value as its bin on a log2 grid of
     `CODE_RESOLUTION` = 2,048 bins per octave (`codes`, 0.034% wide: the median, a bin's
     centre, is within 0.017%);
  3. beyond: a histogram on a grid of `RESOLUTION` = 256 bins per octave (`hist_start`: first
     bin, `hist`: counts of consecutive bins); with this many cells the median's bin holds
     enough values that placing them evenly by rank keeps the estimate within 0.1%.

Memory is bounded per gene (8 KB of values, 40 KB of codes, or one histogram over the gene's
range), whatever the number of cells and datasets; the statistics add exactly across files
(codes and histogram counts are integers; a tier-3 bin is a tier-2 code divided by 8), and
the merged result depends only on the set of inputs: merges visit them in a fixed order (sorted
by name). Geneformer merged t-digests of its corpus (Theodoris et al. 2023); the tiers give
exact medians for rare genes and bounded error for the others (`tests/test_gene_stats.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
import polars as pl
import scipy.sparse as sp

from cellfoundry.config import schema_default

# Tier 3 histogram resolution (bins per octave) and tier 2 code resolution (a multiple of it).
RESOLUTION = 256
CODE_RESOLUTION = 2048
_CODE_SHIFT = 3  # CODE_RESOLUTION = RESOLUTION << _CODE_SHIFT
# Codes and bins are of y = -log2(value / target_sum) = -log2(count / total) in [0, 32):
# a uint16 code holds it at 2,048 per octave (cells of up to 2^32 counts).
_N_CODES = 32 * CODE_RESOLUTION
# Genes detected in at most this many cells keep exact values (config gene_stats.exact_max_cells);
# up to QUANTIZED_MAX_CELLS, codes.
EXACT_MAX_CELLS = schema_default("gene_stats.exact_max_cells")
QUANTIZED_MAX_CELLS = 10_000
# Genes per table (parquet row group) when statistics are written table by table.
GENES_PER_TABLE = 2048
SCHEMA = {
    "gene_id": pl.Utf8,
    "n_obs": pl.Int64,
    "n_cells": pl.Int64,
    "sum": pl.Float64,
    "sum_sq": pl.Float64,
    "values": pl.List(pl.Float64),
    "codes": pl.List(pl.UInt16),
    "hist_start": pl.Int32,
    "hist": pl.List(pl.Int64),
    "target_sum": pl.Float64,
}
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_EXACT, _CODED, _BINNED = 0, 1, 2
# Histograms cover the 32 octaves of y.
_MIN_BIN, _MAX_BIN = 0, 32 * RESOLUTION
_SPAN = _MAX_BIN - _MIN_BIN
# Spare bins allocated around a histogram when it grows (amortises re-allocation).
_HIST_SLACK = 64
# Pools a kernel ran out of (it returns where to resume once the pool has grown).
_FULL_VALUES, _FULL_CODES, _FULL_HIST = 1, 2, 3


@numba.njit(**_JIT)
def _code(value, target_sum):
    code = np.int64(np.floor(-np.log2(value / target_sum) * CODE_RESOLUTION))
    return min(max(code, 0), _N_CODES - 1)


# The per-gene state lives in flat pools (numpy arrays, no per-gene objects, so the kernels run
# at native speed): a gene's values (tier 1) or codes (tier 2) occupy a region [off, off + cap)
# of the value or code pool, its histogram (tier 3) a region of the histogram pool starting at
# bin hstart. A region that grows moves to the end of its pool; the dead space is reclaimed by
# `_compact_pool`. `st` holds per gene: tier, fill, off, cap, hstart, hlen; `tops` the used
# length of each pool. Before each entry a kernel checks that the pools can absorb the worst
# case of one step; if not, it returns the entry to resume from and which pool to grow.


@numba.njit(**_JIT)
def _room(exact_max, coded_max):
    """Free entries each pool must have before a kernel step (its worst case: a region moved
    to the end of its pool, or a histogram spanning every bin)."""
    return 2 * exact_max + 8, 2 * coded_max + 64, _SPAN + 2 * _HIST_SLACK


@numba.njit(**_JIT)
def _has_room(vpool, cpool, hpool, tops, exact_max, coded_max):
    need = _room(exact_max, coded_max)
    if tops[0] + need[0] > vpool.shape[0]:
        return _FULL_VALUES
    if tops[1] + need[1] > cpool.shape[0]:
        return _FULL_CODES
    if tops[2] + need[2] > hpool.shape[0]:
        return _FULL_HIST
    return 0


@numba.njit(**_JIT)
def _hist_add(st, hpool, tops, gene, b, count):  # pragma: no cover - compiled
    b = min(max(b, _MIN_BIN), _MAX_BIN - 1)
    _hist_cover(st, hpool, tops, gene, b, b + 1)
    hpool[st[gene, 2] + b - st[gene, 4]] += count


@numba.njit(**_JIT)
def _hist_cover(st, hpool, tops, gene, low, high):  # pragma: no cover - compiled
    """Make a gene's histogram region cover bins [low, high) (one move at most)."""
    off, start, length = st[gene, 2], st[gene, 4], st[gene, 5]
    if length and start <= low and high <= start + length:
        return
    new_low = low - _HIST_SLACK if length == 0 else min(start, low - _HIST_SLACK)
    new_high = high + _HIST_SLACK if length == 0 else max(start + length, high + _HIST_SLACK)
    new_low, new_high = max(new_low, _MIN_BIN), min(new_high, _MAX_BIN)
    new = tops[2]
    hpool[new : new + new_high - new_low] = 0
    if length:
        hpool[new + start - new_low : new + start - new_low + length] = hpool[off : off + length]
        tops[5] += length
    tops[2] = new + new_high - new_low
    st[gene, 2], st[gene, 4], st[gene, 5] = new, new_low, new_high - new_low


@numba.njit(**_JIT)
def _to_codes(st, vpool, cpool, tops, gene, coded_max, target_sum):  # pragma: no cover - compiled
    n, off = st[gene, 1], st[gene, 2]
    cap = min(max(2 * n, 64), max(coded_max, 1))
    new = tops[1]
    for i in range(n):
        cpool[new + i] = _code(vpool[off + i], target_sum)
    tops[1] = new + cap
    tops[3] += st[gene, 3]
    st[gene, 0], st[gene, 2], st[gene, 3] = _CODED, new, cap


@numba.njit(**_JIT)
def _to_hist(st, cpool, hpool, tops, gene):  # pragma: no cover - compiled
    n, off = st[gene, 1], st[gene, 2]
    tops[4] += st[gene, 3]
    if n == 0:  # nothing to bin yet: the first bin added allocates the region
        st[gene, 0], st[gene, 1], st[gene, 2], st[gene, 3], st[gene, 5] = _BINNED, 0, 0, 0, 0
        return
    # One region covering every code's bin (at most _SPAN bins: within the room checked).
    low, high = _MAX_BIN, _MIN_BIN
    for i in range(n):
        b = np.int64(cpool[off + i]) >> _CODE_SHIFT
        low, high = min(low, b), max(high, b + 1)
    low, high = max(low - _HIST_SLACK, _MIN_BIN), min(high + _HIST_SLACK, _MAX_BIN)
    new = tops[2]
    hpool[new : new + high - low] = 0
    tops[2] = new + high - low
    st[gene, 0], st[gene, 1], st[gene, 2], st[gene, 3] = _BINNED, 0, new, 0
    st[gene, 4], st[gene, 5] = low, high - low
    for i in range(n):
        hpool[new + (np.int64(cpool[off + i]) >> _CODE_SHIFT) - low] += 1


@numba.njit(**_JIT)
def _append(
    st, vpool, cpool, hpool, tops, gene, value, code, exact_max, coded_max, target_sum
):  # pragma: no cover - compiled
    """Add one value (or, when value < 0, one code) to a gene, moving it up a tier when full."""
    if st[gene, 0] == _EXACT and (value < 0 or st[gene, 1] >= exact_max):
        _to_codes(st, vpool, cpool, tops, gene, coded_max, target_sum)
    if st[gene, 0] == _CODED and st[gene, 1] >= coded_max:
        _to_hist(st, cpool, hpool, tops, gene)
    tier = st[gene, 0]
    if tier == _BINNED:
        _hist_add(
            st,
            hpool,
            tops,
            gene,
            (code if value < 0 else _code(value, target_sum)) >> _CODE_SHIFT,
            1,
        )
        return
    n, off, cap = st[gene, 1], st[gene, 2], st[gene, 3]
    pool_index = 0 if tier == _EXACT else 1
    if n == cap:  # move the region to the end of its pool, twice as large
        limit = exact_max if tier == _EXACT else coded_max
        new_cap = min(max(cap + cap // 2, 8 if tier == _EXACT else 64), max(limit, 1))
        new = tops[pool_index]
        if tier == _EXACT:
            vpool[new : new + n] = vpool[off : off + n]
        else:
            cpool[new : new + n] = cpool[off : off + n]
        tops[pool_index] = new + new_cap
        tops[3 + pool_index] += cap
        st[gene, 2], st[gene, 3] = new, new_cap
        off = new
    if tier == _EXACT:
        vpool[off + n] = value
    else:
        cpool[off + n] = code if value < 0 else _code(value, target_sum)
    st[gene, 1] = n + 1


@numba.njit(**_JIT)
def _reserve(st, vpool, cpool, tops, gene, need, limit, pool_index):  # pragma: no cover - compiled
    """Make a tier-1 or tier-2 region hold at least `need` entries (at most `limit`)."""
    n, off, cap = st[gene, 1], st[gene, 2], st[gene, 3]
    if need <= cap:
        return
    new_cap = min(max(cap + cap // 2, need, 8 if pool_index == 0 else 64), max(limit, 1))
    new = tops[pool_index]
    if pool_index == 0:
        vpool[new : new + n] = vpool[off : off + n]
    else:
        cpool[new : new + n] = cpool[off : off + n]
    tops[pool_index] = new + new_cap
    tops[3 + pool_index] += cap
    st[gene, 2], st[gene, 3] = new, new_cap


@numba.njit(**_JIT)
def _append_run(
    st, vpool, cpool, hpool, tops, gene, values, bins, exact_max, coded_max, target_sum
):  # pragma: no cover - compiled
    """Add a gene's run of values in order, moving it up the tiers as it fills (one region
    move per tier at most, within what `_has_room` guarantees)."""
    i = 0
    m = values.shape[0]
    while i < m:
        tier = st[gene, 0]
        n = st[gene, 1]
        if tier == _EXACT:
            if n >= exact_max:
                _to_codes(st, vpool, cpool, tops, gene, coded_max, target_sum)
                continue
            take = min(m - i, exact_max - n)
            _reserve(st, vpool, cpool, tops, gene, n + take, exact_max, 0)
            off = st[gene, 2]
            vpool[off + n : off + n + take] = values[i : i + take]
        elif tier == _CODED:
            if n >= coded_max:
                _to_hist(st, cpool, hpool, tops, gene)
                continue
            take = min(m - i, coded_max - n)
            _reserve(st, vpool, cpool, tops, gene, n + take, coded_max, 1)
            off = st[gene, 2]
            for k in range(take):
                cpool[off + n + k] = _code(values[i + k], target_sum)
        else:
            low, high = _MAX_BIN, _MIN_BIN
            for k in range(i, m):
                b = _code(values[k], target_sum) >> _CODE_SHIFT
                bins[k] = b
                low, high = min(low, b), max(high, b)
            _hist_cover(st, hpool, tops, gene, low, high + 1)
            off, start = st[gene, 2], st[gene, 4]
            for k in range(i, m):
                hpool[off + bins[k] - start] += 1
            return
        st[gene, 1] = n + take
        i += take


@numba.njit(**_JIT)
def _values_by_gene(
    indptr, indices, counts, total_counts, target_sum, col_ptr, values
):  # pragma: no cover - compiled
    """A block's normalized values regrouped gene by gene (a counting sort), each gene's in
    the order of cells, into `values`, with gene offsets into `col_ptr` (n_genes + 1)."""
    col_ptr[:] = 0
    for j in range(indices.shape[0]):
        col_ptr[indices[j] + 1] += 1
    for g in range(col_ptr.shape[0] - 1):
        col_ptr[g + 1] += col_ptr[g]
    position = col_ptr[:-1].copy()
    for cell in range(indptr.shape[0] - 1):
        total = total_counts[cell]
        for j in range(indptr[cell], indptr[cell + 1]):
            gene = indices[j]
            values[position[gene]] = counts[j] / total * target_sum
            position[gene] += 1


@numba.njit(**_JIT)
def _add_cells(
    col_ptr,
    values,
    target_sum,
    resume,
    n_cells,
    sums,
    sums_sq,
    st,
    vpool,
    cpool,
    hpool,
    tops,
    exact_max,
    coded_max,
):  # pragma: no cover - compiled
    # Gene by gene, each gene's cells in file order: the float sums and the stored values
    # follow the order of cells, so they do not depend on block boundaries; and the gene's
    # state stays in cache while its run is added.
    longest = 1
    for gene in range(col_ptr.shape[0] - 1):
        longest = max(longest, col_ptr[gene + 1] - col_ptr[gene])
    bins = np.empty(longest, dtype=np.int64)
    for gene in range(resume[0], col_ptr.shape[0] - 1):
        lo, hi = col_ptr[gene], col_ptr[gene + 1]
        if lo == hi:
            continue
        full = _has_room(vpool, cpool, hpool, tops, exact_max, coded_max)
        if full:
            resume[0] = gene
            return full
        for k in range(lo, hi):
            sums[gene] += values[k]
            sums_sq[gene] += values[k] * values[k]
        n_cells[gene] += hi - lo
        _append_run(
            st,
            vpool,
            cpool,
            hpool,
            tops,
            gene,
            values[lo:hi],
            bins,
            exact_max,
            coded_max,
            target_sum,
        )
    resume[0] = col_ptr.shape[0] - 1
    return 0


@numba.njit(**_JIT)
def _add_rows(
    genes,
    row_n_cells,
    row_sums,
    row_sums_sq,
    value_offsets,
    row_values,
    code_offsets,
    row_codes,
    hist_offsets,
    hist_starts,
    hist_counts,
    resume,
    n_cells,
    sums,
    sums_sq,
    st,
    vpool,
    cpool,
    hpool,
    tops,
    exact_max,
    coded_max,
    target_sum,
):  # pragma: no cover - compiled
    # resume: [row, stage (0 totals, 1 histogram, 2 codes, 3 values), position in the stage]
    while resume[0] < genes.shape[0]:
        row = resume[0]
        gene = genes[row]
        if resume[1] == 0:
            n_cells[gene] += row_n_cells[row]
            sums[gene] += row_sums[row]
            sums_sq[gene] += row_sums_sq[row]
            resume[1], resume[2] = 1, hist_offsets[row]
        if resume[1] == 1:
            while resume[2] < hist_offsets[row + 1]:
                full = _has_room(vpool, cpool, hpool, tops, exact_max, coded_max)
                if full:
                    return full
                j = resume[2]
                if hist_counts[j]:
                    if st[gene, 0] == _EXACT:
                        _to_codes(st, vpool, cpool, tops, gene, coded_max, target_sum)
                        continue
                    if st[gene, 0] == _CODED:
                        _to_hist(st, cpool, hpool, tops, gene)
                        continue
                    b = hist_starts[row] + j - hist_offsets[row]
                    _hist_add(st, hpool, tops, gene, b, hist_counts[j])
                resume[2] = j + 1
            resume[1], resume[2] = 2, code_offsets[row]
        if resume[1] == 2:
            while resume[2] < code_offsets[row + 1]:
                full = _has_room(vpool, cpool, hpool, tops, exact_max, coded_max)
                if full:
                    return full
                _append(
                    st,
                    vpool,
                    cpool,
                    hpool,
                    tops,
                    gene,
                    -1.0,
                    row_codes[resume[2]],
                    exact_max,
                    coded_max,
                    target_sum,
                )
                resume[2] += 1
            resume[1], resume[2] = 3, value_offsets[row]
        if resume[1] == 3:
            while resume[2] < value_offsets[row + 1]:
                full = _has_room(vpool, cpool, hpool, tops, exact_max, coded_max)
                if full:
                    return full
                _append(
                    st,
                    vpool,
                    cpool,
                    hpool,
                    tops,
                    gene,
                    row_values[resume[2]],
                    0,
                    exact_max,
                    coded_max,
                    target_sum,
                )
                resume[2] += 1
        resume[0], resume[1], resume[2] = row + 1, 0, 0
    return 0


@numba.njit(**_JIT)
def _compact_pool(st, pool, tops, tier):  # pragma: no cover - compiled
    """Slide the regions of one pool (tier 0 values, 1 codes, 2 histograms) down over its dead
    space, in place: regions move in order of offset, so none is overwritten before it moves."""
    width = 5 if tier == _BINNED else 3  # the region's length: histogram bins or capacity
    genes = np.empty(st.shape[0], dtype=np.int64)
    offsets = np.empty(st.shape[0], dtype=np.int64)
    m = 0
    for g in range(st.shape[0]):
        if st[g, 0] == tier and st[g, width] > 0:
            genes[m], offsets[m] = g, st[g, 2]
            m += 1
    top = 0
    for g in genes[np.argsort(offsets[:m])]:
        off, length = st[g, 2], st[g, width]
        live = length if tier == _BINNED else st[g, 1]
        for i in range(live):
            pool[top + i] = pool[off + i]
        st[g, 2] = top
        top += length
    tops[tier], tops[3 + tier] = top, 0


@numba.njit(**_JIT)
def _flatten(st, vpool, cpool, hpool):  # pragma: no cover - compiled
    """Per gene, its values (tier 1) or codes (tier 2) in the order they were added, or its
    trimmed histogram (tier 3), as flat arrays with row offsets, and each histogram's first
    bin."""
    n = st.shape[0]
    v_off = np.zeros(n + 1, dtype=np.int64)
    c_off = np.zeros(n + 1, dtype=np.int64)
    h_off = np.zeros(n + 1, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    for g in range(n):
        tier = st[g, 0]
        v_off[g + 1] = v_off[g] + (st[g, 1] if tier == _EXACT else 0)
        c_off[g + 1] = c_off[g] + (st[g, 1] if tier == _CODED else 0)
        lo, hi = 0, 0
        if tier == _BINNED:
            off, hi = st[g, 2], st[g, 5]
            while lo < hi and hpool[off + lo] == 0:
                lo += 1
            while hi > lo and hpool[off + hi - 1] == 0:
                hi -= 1
        first[g] = lo
        h_off[g + 1] = h_off[g] + hi - lo
    values = np.empty(v_off[n], dtype=np.float64)
    codes = np.empty(c_off[n], dtype=np.uint16)
    hist = np.empty(h_off[n], dtype=np.int64)
    starts = np.zeros(n, dtype=np.int32)
    for g in range(n):
        tier, count, off = st[g, 0], st[g, 1], st[g, 2]
        if tier == _EXACT and count:
            values[v_off[g] : v_off[g + 1]] = vpool[off : off + count]
        elif tier == _CODED:
            codes[c_off[g] : c_off[g + 1]] = cpool[off : off + count]
        elif h_off[g + 1] > h_off[g]:
            lo = first[g]
            hist[h_off[g] : h_off[g + 1]] = hpool[off + lo : off + lo + h_off[g + 1] - h_off[g]]
            starts[g] = st[g, 4] + lo
    return values, v_off, codes, c_off, hist, h_off, starts


class GeneStatsAccumulator:
    """Mergeable per-gene statistics of cells or of statistics tables, added in order.

    Parameters
    ----------
    n_genes
        Genes (columns) the statistics are kept for; entries refer to them by index.
    target_sum
        Library size of the normalization (`count / total_counts * target_sum`).
    exact_max_cells
        Genes detected in at most this many cells keep their exact values.
    quantized_max_cells
        Up to this many cells, values are kept as fine log2 codes; beyond, a histogram.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        target_sum: float = 10_000.0,
        exact_max_cells: int = EXACT_MAX_CELLS,
        quantized_max_cells: int = QUANTIZED_MAX_CELLS,
    ) -> None:
        self.n_genes, self.target_sum = n_genes, float(target_sum)
        self.exact_max = int(exact_max_cells)
        self.coded_max = max(int(quantized_max_cells), self.exact_max, 1)
        self.n_obs = np.zeros(n_genes, dtype=np.int64)
        self.n_cells = np.zeros(n_genes, dtype=np.int64)
        self.sums = np.zeros(n_genes, dtype=np.float64)
        self.sums_sq = np.zeros(n_genes, dtype=np.float64)
        self._st = np.zeros((n_genes, 6), dtype=np.int64)
        self._tops = np.zeros(6, dtype=np.int64)
        self._vpool = np.empty(1 << 16, dtype=np.float64)
        self._cpool = np.empty(1 << 18, dtype=np.uint16)
        self._hpool = np.empty(1 << 18, dtype=np.int32)
        self._block_col_ptr = np.zeros(n_genes + 1, dtype=np.int64)
        self._block_values = np.empty(0)

    def _grow(self, full: int) -> None:
        """Make room in the pool a kernel ran out of: slide its regions over the dead space
        when over a fifth of it is dead, and grow it by a quarter when it still lacks room.
        Growing is a realloc (large blocks are remapped, not copied), so small steps cost
        nothing extra and keep little unused memory resident."""
        index = full - 1  # = the tier whose pool is full
        name = ("_vpool", "_cpool", "_hpool")[index]
        if self._tops[3 + index] * 5 > self._tops[index]:
            _compact_pool(self._st, getattr(self, name), self._tops, index)
        pool, used = getattr(self, name), self._tops[index]
        need = _room(self.exact_max, self.coded_max)[index]
        if used + need > len(pool):
            pool.resize(max(len(pool) + len(pool) // 4, used + 2 * need), refcheck=False)

    def _pools(self) -> tuple:
        return self._st, self._vpool, self._cpool, self._hpool, self._tops

    def add_cells(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        counts: np.ndarray,
        total_counts: np.ndarray,
    ) -> None:
        """Add a block of cells: CSR arrays over this accumulator's genes (raw counts) and each
        cell's total count (the normalization's denominator, > 0)."""
        indptr = np.asarray(indptr, dtype=np.int64)
        indptr = indptr - indptr[0]
        self.n_obs += len(indptr) - 1
        if len(self._block_values) < len(indices):  # reused from block to block
            self._block_values = np.empty(len(indices) + len(indices) // 4)
        col_ptr, values = self._block_col_ptr, self._block_values[: len(indices)]
        _values_by_gene(
            indptr,
            np.asarray(indices),
            np.asarray(counts),
            np.asarray(total_counts, dtype=np.float64),
            self.target_sum,
            col_ptr,
            values,
        )
        resume = np.zeros(2, dtype=np.int64)
        args = (col_ptr, values, self.target_sum, resume, self.n_cells, self.sums, self.sums_sq)
        while full := _add_cells(*args, *self._pools(), self.exact_max, self.coded_max):
            self._grow(full)

    def add_table(self, table: pl.DataFrame, genes: np.ndarray) -> None:
        """Add a statistics table (`SCHEMA`) whose row i is gene `genes[i]` of this accumulator."""

        def flat(column: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
            series = table[column]
            offsets = np.concatenate([[0], np.cumsum(series.list.len().to_numpy())]).astype(
                np.int64
            )
            return series.explode().drop_nulls().to_numpy().astype(dtype), offsets

        values, value_offsets = flat("values", np.float64)
        codes, code_offsets = flat("codes", np.int64)
        hist, hist_offsets = flat("hist", np.int64)
        genes = np.asarray(genes, dtype=np.int64)
        np.add.at(self.n_obs, genes, table["n_obs"].to_numpy())
        resume = np.zeros(3, dtype=np.int64)
        args = (
            genes,
            table["n_cells"].to_numpy().astype(np.int64),
            table["sum"].to_numpy().astype(np.float64),
            table["sum_sq"].to_numpy().astype(np.float64),
            value_offsets,
            values,
            code_offsets,
            codes,
            hist_offsets,
            table["hist_start"].to_numpy().astype(np.int64),
            hist,
            resume,
            self.n_cells,
            self.sums,
            self.sums_sq,
        )
        while full := _add_rows(
            *args, *self._pools(), self.exact_max, self.coded_max, self.target_sum
        ):
            self._grow(full)

    def table(self, gene_ids: Sequence[str] | np.ndarray) -> pl.DataFrame:
        """The statistics as one table (`SCHEMA`): `tables` concatenated."""
        return pl.concat(list(self.tables(gene_ids)), rechunk=True)

    def tables(
        self, gene_ids: Sequence[str] | np.ndarray, genes_per_table: int = GENES_PER_TABLE
    ) -> Iterator[pl.DataFrame]:
        """The statistics as tables (`SCHEMA`) of `genes_per_table` consecutive genes each,
        in the order of `gene_ids` (one per gene of the accumulator); values and codes in the
        order they were added (cells in file order, inputs in merge order).

        Each table is built when asked for, so writing them one by one (`write_gene_stats`)
        holds one table's copy of the pools, not all of them."""
        gene_ids = np.asarray(gene_ids, dtype=str)
        if len(gene_ids) != self.n_genes:
            raise ValueError(f"{len(gene_ids)} gene IDs for {self.n_genes} genes")
        for lo in range(0, max(self.n_genes, 1), genes_per_table):
            rows = slice(lo, min(lo + genes_per_table, self.n_genes))
            values, v_off, codes, c_off, hist, h_off, starts = _flatten(
                self._st[rows], self._vpool, self._cpool, self._hpool
            )
            yield pl.DataFrame(
                {
                    "gene_id": gene_ids[rows],
                    "n_obs": self.n_obs[rows],
                    "n_cells": self.n_cells[rows],
                    "sum": self.sums[rows],
                    "sum_sq": self.sums_sq[rows],
                    "values": _list_series(values, v_off, pl.Float64),
                    "codes": _list_series(codes, c_off, pl.UInt16),
                    "hist_start": starts,
                    "hist": _list_series(hist, h_off, pl.Int64),
                    "target_sum": np.full(len(starts), self.target_sum),
                }
            ).cast(SCHEMA)


def compute_gene_stats(
    X: sp.csr_matrix,
    gene_ids: Sequence[str] | np.ndarray,
    total_counts: np.ndarray,
    *,
    target_sum: float = 10_000.0,
    exact_max_cells: int = EXACT_MAX_CELLS,
) -> pl.DataFrame:
    """Statistics (`SCHEMA`) of a count matrix in memory (cells x genes, CSR, raw counts) whose
    columns are `gene_ids`, normalized by each cell's `total_counts`. Files are streamed
    through `GeneStatsAccumulator` instead."""
    X = sp.csr_matrix(X)
    accumulator = GeneStatsAccumulator(
        X.shape[1], target_sum=target_sum, exact_max_cells=exact_max_cells
    )
    accumulator.add_cells(X.indptr, X.indices, X.data, np.asarray(total_counts, dtype=np.float64))
    return accumulator.table(gene_ids)


def _list_series(flat: np.ndarray, offsets: np.ndarray, dtype: pl.DataType) -> pl.Series:
    """A list column from flat values and row offsets (CSR-like), without a Python loop."""
    import pyarrow as pa

    array = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat))
    return pl.Series(pl.from_arrow(array)).cast(pl.List(dtype))


def empty_table() -> pl.DataFrame:
    """A statistics table with no gene."""
    return pl.DataFrame(schema=SCHEMA)


def write_gene_stats(tables: pl.DataFrame | Iterable[pl.DataFrame], path: str | Path) -> None:
    """Write statistics (`SCHEMA`), one table or tables in order (one parquet row group each,
    so a file's statistics are written without holding them all: `GeneStatsAccumulator.tables`).

    Compressed with snappy after dictionary encoding: the codes of a 100k-cell file (tens of
    millions) barely compress further (zstd level 1 gives a 3% smaller file) and snappy writes
    them 1.8x faster (`benchmarks/bench_scale.py` outputs)."""
    import pyarrow.parquet as pq

    if isinstance(tables, pl.DataFrame):
        tables = [tables]
    with pq.ParquetWriter(
        path,
        empty_table().to_arrow().schema,
        compression="snappy",
        write_statistics=False,
    ) as writer:
        for table in tables:
            writer.write_table(table.to_arrow())


def merge_gene_stats(
    tables: Iterable[pl.DataFrame | str | Path],
    *,
    exact_max_cells: int = EXACT_MAX_CELLS,
    quantized_max_cells: int = QUANTIZED_MAX_CELLS,
) -> pl.DataFrame:
    """Add statistics tables (or parquet files of them) gene by gene.

    Tables are visited in the order given; callers pass them sorted by name, so the merged
    bytes depend only on the set of inputs. Memory holds one input table at a time plus the
    merged state (bounded per gene, see the module docstring).
    """
    sources = list(tables)
    heads = [_read(source, ["gene_id", "target_sum"]) for source in sources]
    target_sums = {float(t) for head in heads for t in head["target_sum"].unique().to_list()}
    if len(target_sums) > 1:
        raise ValueError(
            f"gene statistics were made with different target_sum values {sorted(target_sums)}; "
            "their normalized values cannot be merged"
        )
    gene_ids = sorted(set().union(*(set(head["gene_id"].to_list()) for head in heads)))
    index = {g: i for i, g in enumerate(gene_ids)}
    accumulator = GeneStatsAccumulator(
        len(gene_ids),
        target_sum=target_sums.pop() if target_sums else 10_000.0,
        exact_max_cells=exact_max_cells,
        quantized_max_cells=quantized_max_cells,
    )
    for source in sources:
        table = _read(source)
        genes = np.fromiter((index[g] for g in table["gene_id"].to_list()), np.int64, table.height)
        accumulator.add_table(table, genes)
    return accumulator.table(gene_ids)


def _read(source: pl.DataFrame | str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    if isinstance(source, pl.DataFrame):
        return source.select(columns) if columns else source
    return pl.read_parquet(source, columns=columns)


@numba.njit(**_JIT)
def _order_statistic(hist, start, rank):  # pragma: no cover - compiled
    """y = -log2(value / target_sum) of the 0-based `rank` (ascending y) in a histogram: its
    bin, with the bin's values placed evenly by rank."""
    seen = 0
    for i in range(hist.shape[0]):
        count = hist[i]
        if rank < seen + count:
            return (start + i + (rank - seen + 0.5) / count) / RESOLUTION
        seen += count
    return np.nan


@numba.njit(**_JIT)
def _hist_medians(offsets, flat, starts, n, target_sum):  # pragma: no cover - compiled
    out = np.full(offsets.shape[0] - 1, np.nan)
    for g in range(out.shape[0]):
        if n[g] == 0 or offsets[g + 1] == offsets[g]:
            continue
        hist = flat[offsets[g] : offsets[g + 1]]
        a = target_sum[g] * np.exp2(-_order_statistic(hist, starts[g], (n[g] - 1) // 2))
        b = target_sum[g] * np.exp2(-_order_statistic(hist, starts[g], n[g] // 2))
        out[g] = (a + b) / 2
    return out


def nonzero_medians(stats: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Median of each gene's non-zero normalized values, and whether it is exact.

    Exact values give `np.median`'s result (the mean of the two middle values for an even
    count); codes the mean of the two middle codes' bin centres (log scale); histograms the
    mean of the two middle order statistics, each estimated by spreading its bin's values
    evenly (by rank) over the bin on the log scale. Genes never detected get NaN.
    """
    medians = np.full(stats.height, np.nan)
    target_sum = stats["target_sum"].to_numpy().astype(np.float64)
    exact = (stats["values"].list.len() > 0).to_numpy()
    for i, values in zip(
        np.flatnonzero(exact), stats.filter(pl.Series(exact))["values"].to_list(), strict=True
    ):
        medians[i] = np.median(np.asarray(values, dtype=np.float64))
    coded = (stats["codes"].list.len() > 0).to_numpy()
    for i, codes in zip(
        np.flatnonzero(coded), stats.filter(pl.Series(coded))["codes"].to_list(), strict=True
    ):
        codes = np.sort(np.asarray(codes, dtype=np.float64))
        n = len(codes)
        middle = codes[[(n - 1) // 2, n // 2]]
        medians[i] = float(np.mean(target_sum[i] * np.exp2(-(middle + 0.5) / CODE_RESOLUTION)))
    hist = stats["hist"]
    offsets = np.concatenate([[0], np.cumsum(hist.list.len().to_numpy())]).astype(np.int64)
    flat = hist.explode().drop_nulls().to_numpy().astype(np.int64)
    binned = (hist.list.len() > 0).to_numpy()
    from_hist = _hist_medians(
        offsets,
        flat,
        stats["hist_start"].to_numpy().astype(np.int64),
        stats["n_cells"].to_numpy().astype(np.int64),
        target_sum,
    )
    medians[binned] = from_hist[binned]
    return medians, exact


def summarize(stats: pl.DataFrame) -> pl.DataFrame:
    """Per-gene mean, variance (over all measured cells, ddof=1) and non-zero median.

    Columns: gene_id, n_obs, n_cells, mean, var, nonzero_median (0 for genes never detected),
    median_exact (whether the median came from exact values).
    """
    n = stats["n_obs"].to_numpy().astype(np.float64)
    total = stats["sum"].to_numpy()
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    var = np.divide(
        stats["sum_sq"].to_numpy() - n * mean * mean, n - 1, out=np.zeros_like(total), where=n > 1
    )
    medians, exact = nonzero_medians(stats)
    return pl.DataFrame(
        {
            "gene_id": stats["gene_id"],
            "n_obs": stats["n_obs"],
            "n_cells": stats["n_cells"],
            "mean": mean,
            "var": np.maximum(var, 0.0),
            "nonzero_median": np.nan_to_num(medians, nan=0.0),
            "median_exact": exact,
        }
    )


class ImportedMedians(NamedTuple):
    """A gene summary whose medians were replaced by imported ones, and what that changed."""

    summary: pl.DataFrame
    n_imported: int  # genes of the summary that took an imported median
    n_without: int  # genes of the summary absent from the dictionary: median null, not ranked
    n_unused: int  # dictionary genes absent from the summary (never seen in the corpus)


def with_imported_medians(summary: pl.DataFrame, medians: dict[str, float]) -> ImportedMedians:
    """Replace the corpus non-zero medians of a gene summary by imported ones (Geneformer's).

    Geneformer's tokenizer (`TranscriptomeTokenizer`) ranks only the genes of its median
    dictionary: genes without a median are dropped from every cell. Faithfully, a gene of
    the summary absent from `medians` gets a null `nonzero_median`, which the loader treats
    as "not rankable" (like a gene never seen non-zero), so that the tokens of a cell are
    Geneformer's. Other columns are unchanged.

    Parameters
    ----------
    summary
        A species' gene summary (`summarize`): gene_id, n_obs, n_cells, mean, var,
        nonzero_median.
    medians
        Ensembl ID -> non-zero median of count / n_counts x 10,000
        (`vocabulary.read_gene_median_dictionary`).

    Returns
    -------
    The summary with its new medians, and the counts of genes that took one, that have none,
    and of dictionary genes not in the summary.
    """
    imported = pl.DataFrame(
        {"gene_id": list(medians), "imported": list(medians.values())},
        schema={"gene_id": pl.Utf8, "imported": pl.Float64},
    )
    joined = summary.join(imported, on="gene_id", how="left")
    n_imported = int(joined["imported"].is_not_null().sum())
    table = joined.with_columns(pl.col("imported").alias("nonzero_median")).drop("imported")
    return ImportedMedians(
        table.select(summary.columns),
        n_imported,
        summary.height - n_imported,
        len(medians) - n_imported,
    )
