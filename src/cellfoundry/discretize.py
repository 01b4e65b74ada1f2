"""Fast per-cell kernels of preprocessing on raw-count CSR matrices.

Everything here works on cells x genes CSR data of raw integer counts: ``indptr`` (int64),
``indices`` (int32 or int64) and ``data`` (any integer or float dtype holding counts). Each kernel
has an array-level function and, where that is the natural unit, a thin wrapper that takes a
:class:`scipy.sparse.csr_matrix`.

- :func:`qc_metrics`: total counts, detected genes and mitochondrial fraction per cell.
- :func:`quantile_bins`: scGPT's per-cell quantile bins of the non-zero counts, ties between
  equal edges broken at random (scGPT's rule, reproducibly from a seed) or to the highest.
- :func:`rank_order`: Geneformer-style rank-value encoding (gene indices, highest first).

The kernels are compiled with numba (``cache=True``, so a new process loads them from
``__pycache__`` instead of compiling). With ``parallel=False`` (the default) a kernel runs in the
calling thread with the GIL released: deterministic, and safe in forked data-loader workers. With
``parallel=True`` cells are split into chunks over numba's thread pool; the output is identical.
Do not call parallel kernels in a process forked from one that already used them: numba's OpenMP
threading layer is not fork-safe.

The ``*_reference`` functions are deliberately plain numpy, row by row, as the anchors compute
these quantities; tests check the kernels against them bit for bit and the benchmark uses them
as baselines.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import scipy.sparse as sp

__all__ = [
    "TIE_BREAKS",
    "QCMetrics",
    "qc_metrics",
    "qc_metrics_csr",
    "quantile_bins",
    "quantile_bins_csr",
    "quantile_bins_reference",
    "rank_order",
    "rank_order_matrix",
    "rank_order_reference",
    "scgpt_digitize",
    "tie_uniforms",
]

# Rows whose non-zero counts are all integers in [1, limit] are binned through a histogram of
# their values instead of a sort; limit = min(_HIST_CAP, _HIST_PER_NNZ * nnz + _HIST_BASE) keeps
# the histogram walk no more expensive than sorting that row would be.
_HIST_CAP = 1 << 16
_HIST_PER_NNZ = 16
_HIST_BASE = 256
# Rank order: rows up to _SMALL_ROW entries use a comparison sort, longer ones two radix passes
# of _RADIX_BITS bits; key ties longer than _SMALL_RUN that are out of order are re-sorted.
_SMALL_ROW = 64
_RADIX_BITS = 11
_SMALL_RUN = 32

# Tie-break rules of quantile_bins: "random" is scGPT's, "highest" np.digitize's.
TIE_BREAKS = ("random", "highest")

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _n_chunks(n_cells: int) -> int:
    # A few chunks per thread balance rows of uneven size; each chunk allocates its own scratch.
    return max(1, min(n_cells, 4 * numba.get_num_threads()))


@numba.njit(**_JIT)
def _chunk_bounds(n_cells: int, n_chunks: int, chunk: int) -> tuple[int, int]:
    return chunk * n_cells // n_chunks, (chunk + 1) * n_cells // n_chunks


@numba.njit(**_JIT)
def _max_row_nnz(indptr: np.ndarray, lo: int, hi: int) -> int:
    longest = 0
    for cell in range(lo, hi):
        longest = max(longest, indptr[cell + 1] - indptr[cell])
    return longest


def _check_csr_arrays(
    indptr: np.ndarray, indices: np.ndarray | None, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    if indptr.ndim != 1 or indptr.size == 0:
        raise ValueError("indptr must be a non-empty 1-d array (n_cells + 1 entries)")
    data = np.ascontiguousarray(data)
    if data.ndim != 1 or not (
        np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
    ):
        raise ValueError(f"data must be a 1-d integer or float array, got {data.dtype}")
    nnz = data.shape[0]
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must start at 0, be non-decreasing and end at len(data)")
    if indices is not None:
        indices = np.ascontiguousarray(indices)
        if indices.dtype not in (np.int32, np.int64) or indices.shape != data.shape:
            raise ValueError("indices must be int32 or int64 with the same length as data")
    return indptr, indices, data


def _as_csr(X: sp.csr_matrix | sp.csr_array) -> sp.csr_matrix:
    if not sp.issparse(X) or X.format != "csr":
        raise TypeError(f"expected a scipy.sparse CSR matrix, got {type(X).__name__}")
    return X


# --------------------------------------------------------------------------------------------
# QC metrics
# --------------------------------------------------------------------------------------------


class QCMetrics(NamedTuple):
    """Per-cell quality-control metrics.

    Attributes
    ----------
    total_counts
        Sum of counts over all genes (float64).
    n_genes_by_counts
        Number of genes with a non-zero count (int64); stored zeros are not counted.
    mito_fraction
        Counts on mitochondrial genes divided by ``total_counts`` (float64); 0 for empty cells.
    """

    total_counts: np.ndarray
    n_genes_by_counts: np.ndarray
    mito_fraction: np.ndarray


@numba.njit(**_JIT)
def _qc_rows(indptr, indices, data, mito_mask, lo, hi, total, n_genes, mito_fraction):
    n_var = mito_mask.shape[0]
    n_bad = 0
    for cell in range(lo, hi):
        cell_total = 0.0
        cell_mito = 0.0
        detected = 0
        for i in range(indptr[cell], indptr[cell + 1]):
            gene = indices[i]
            if gene < 0 or gene >= n_var:
                n_bad += 1
                continue
            x = np.float64(data[i])
            cell_total += x
            detected += x != 0.0
            if mito_mask[gene]:
                cell_mito += x
        total[cell] = cell_total
        n_genes[cell] = detected
        mito_fraction[cell] = cell_mito / cell_total if cell_total != 0.0 else 0.0
    return n_bad


@numba.njit(cache=True, nogil=True, parallel=True)
def _qc_parallel(indptr, indices, data, mito_mask, total, n_genes, mito_fraction, n_chunks):
    n_cells = indptr.shape[0] - 1
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for chunk in numba.prange(n_chunks):
        lo, hi = _chunk_bounds(n_cells, n_chunks, chunk)
        n_bad[chunk] = _qc_rows(
            indptr, indices, data, mito_mask, lo, hi, total, n_genes, mito_fraction
        )
    return n_bad.sum()


def qc_metrics_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    mito_mask: np.ndarray,
    *,
    parallel: bool = False,
) -> QCMetrics:
    """Compute per-cell QC metrics in one pass over the non-zeros of a CSR matrix.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of a cells x genes count matrix.
    mito_mask
        One boolean per gene, true for mitochondrial genes; its length is the number of genes.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    Total counts, detected genes and mitochondrial fraction per cell.
    """
    indptr, indices, data = _check_csr_arrays(indptr, indices, data)
    mito_mask = np.ascontiguousarray(mito_mask, dtype=np.bool_)
    n_cells = indptr.shape[0] - 1
    total = np.empty(n_cells, dtype=np.float64)
    n_genes = np.empty(n_cells, dtype=np.int64)
    mito_fraction = np.empty(n_cells, dtype=np.float64)
    if parallel:
        n_bad = _qc_parallel(
            indptr, indices, data, mito_mask, total, n_genes, mito_fraction, _n_chunks(n_cells)
        )
    else:
        n_bad = _qc_rows(
            indptr, indices, data, mito_mask, 0, n_cells, total, n_genes, mito_fraction
        )
    if n_bad:
        raise ValueError(f"{n_bad} column indices are outside [0, {mito_mask.shape[0]})")
    return QCMetrics(total, n_genes, mito_fraction)


def qc_metrics(
    X: sp.csr_matrix | sp.csr_array, mito_mask: np.ndarray, *, parallel: bool = False
) -> QCMetrics:
    """Compute per-cell QC metrics of a cells x genes count matrix.

    Parameters
    ----------
    X
        Raw counts, cells x genes, CSR.
    mito_mask
        One boolean per gene (column of ``X``), true for mitochondrial genes.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    Total counts, detected genes and mitochondrial fraction per cell; the same numbers as
    ``scanpy.pp.calculate_qc_metrics`` (``pct_counts_mt / 100``, which is NaN for empty cells
    where ours is 0).
    """
    X = _as_csr(X)
    if len(mito_mask) != X.shape[1]:
        raise ValueError(f"mito_mask has {len(mito_mask)} entries for {X.shape[1]} genes")
    return qc_metrics_csr(X.indptr, X.indices, X.data, mito_mask, parallel=parallel)


# --------------------------------------------------------------------------------------------
# scGPT-style quantile binning
# --------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _hist_kth(hist, k, cursor):
    # Smallest value v with #(values <= v) > k; cursor = (v, #(values <= v)) only moves forward
    # because the ranks asked for are non-decreasing.
    value = cursor[0]
    seen = cursor[1]
    while seen <= k:
        value += 1
        seen += hist[value]
    cursor[0] = value
    cursor[1] = seen
    return np.float64(value)


@numba.njit(**_JIT)
def _lerp(a, b, t):
    # numpy's _lerp, formula for formula: its result on ties and at integer values depends on
    # which of the two expressions is used.
    diff_b_a = b - a
    if t >= 0.5:
        return b - diff_b_a * (1.0 - t)
    return a + diff_b_a * t


@numba.njit(**_JIT)
def _quantile_edges(q, m, largest, use_hist, hist, sorted_vals, cursors, edges):
    # np.quantile(values, q) with method="linear" for m values, as numpy computes it
    # (numpy/lib/_function_base_impl.py: "linear" virtual index, _get_indexes, _get_gamma,
    # _lerp). Order statistics come from the histogram or from the sorted values.
    virtual_max = np.float64(m - 1)
    cursor_prev = cursors[0]
    cursor_next = cursors[1]
    cursors[:] = 0
    for j in range(q.shape[0]):
        virtual = virtual_max * q[j]  # (n - 1) * quantiles
        if virtual >= virtual_max:
            # numpy sets both neighbours to index -1 (the maximum) and gamma = virtual - (-1)
            a = largest
            b = largest
            gamma = virtual + 1.0
        else:
            previous = np.floor(virtual)
            gamma = virtual - previous
            k = np.int64(previous)
            if use_hist:
                a = _hist_kth(hist, k, cursor_prev)
                b = _hist_kth(hist, k + 1, cursor_next)
            else:
                a = sorted_vals[k]
                b = sorted_vals[k + 1]
        edges[j] = _lerp(a, b, gamma)


@numba.njit(**_JIT)
def _n_edges_below(edges, x):
    # np.digitize(x, edges, right=True) == searchsorted(edges, x, side="left") for
    # non-decreasing edges: the number of edges < x.
    lo = 0
    hi = edges.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(**_JIT)
def _n_edges_at_or_below(edges, x):
    # np.digitize(x, edges, right=False) == searchsorted(edges, x, side="right") for
    # non-decreasing edges: the number of edges <= x.
    lo = 0
    hi = edges.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# Counter-based uniforms for scGPT's tie-break: splitmix64's output function (Steele, Lea &
# Flood 2014, "Fast splittable pseudorandom number generators") applied to Weyl-sequence
# counters, so that the number drawn for an entry depends only on (seed, cell, its position in
# the cell's row), not on the block, thread or call that bins it. Each uniform is u = a / 2**32
# with a 32-bit integer a: then scGPT's float expression ceil(u * (lo - hi) + hi) is exact
# (a * (hi - lo) < 2**40 and hi < 2**8 fit in 53 bits) and equals the integer
# hi - ((a * (hi - lo)) >> 32), which the kernel computes.
_SM_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SM_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SM_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFT_30 = np.uint64(30)
_SHIFT_27 = np.uint64(27)
_SHIFT_31 = np.uint64(31)
_SHIFT_32 = np.uint64(32)
_TWO_POW_M32 = 1.0 / 4294967296.0


@numba.njit(**_JIT)
def _mix64(z):
    z = (z ^ (z >> _SHIFT_30)) * _SM_MUL1
    z = (z ^ (z >> _SHIFT_27)) * _SM_MUL2
    return z ^ (z >> _SHIFT_31)


@numba.njit(**_JIT)
def _cell_key(seed, cell):
    # seed: uint64; cell: index of the cell in its file.
    return _mix64(seed + _mix64(np.uint64(cell) * _SM_GAMMA + _SM_GAMMA))


@numba.njit(**_JIT)
def _draw_row(key, n, draws):
    # a of the row's entries 0..n-1: the top 32 bits of splitmix64's outputs. A loop of its
    # own, which the compiler vectorizes: hashing inside the binning loop was 1.5x slower.
    for j in range(n):
        draws[j] = _mix64(key + np.uint64(j) * _SM_GAMMA + _SM_GAMMA) >> _SHIFT_32


@numba.njit(**_JIT)
def _tie_bin(a, below, at_or_below):
    # scGPT's _digitize: ceil(u * (right - left) + left), exactly, for u = a / 2**32.
    return at_or_below - ((np.int64(a) * (at_or_below - below)) >> 32)


@numba.njit(**_JIT)
def _quantile_bins_rows(indptr, data, q, lo, hi, out, random, seed, cell_ids):
    longest = _max_row_nnz(indptr, lo, hi)
    hist_limit = min(_HIST_CAP, _HIST_PER_NNZ * longest + _HIST_BASE)
    hist = np.zeros(hist_limit + 1, dtype=np.int32)
    # Per value v of a row: value_bin[v] = edges <= v, value_span[v] = edges equal to v.
    value_bin = np.zeros(hist_limit + 1, dtype=np.uint8)
    value_span = np.zeros(hist_limit + 1, dtype=np.uint8)
    vals = np.empty(longest, dtype=np.float64)
    draws = np.empty(longest if random else 0, dtype=np.uint32)
    n_edges = q.shape[0]
    edges = np.empty(n_edges, dtype=np.float64)
    cursors = np.empty((2, 2), dtype=np.int64)
    for cell in range(lo, hi):
        start = indptr[cell]
        end = indptr[cell + 1]
        m = 0
        largest = 0.0
        small_ints = True
        for i in range(start, end):
            x = np.float64(data[i])
            if x != 0.0:
                vals[m] = x
                m += 1
                if x >= 1.0 and x <= hist_limit and x == np.float64(np.int64(x)):
                    largest = max(largest, x)
                else:
                    small_ints = False
        if m == 0:
            for i in range(start, end):
                out[i] = 0
            continue
        if random:
            _draw_row(_cell_key(seed, cell_ids[cell]), end - start, draws)
        top = np.int64(largest)
        if small_ints and top <= _HIST_PER_NNZ * m + _HIST_BASE:
            # Counting sort: order statistics and bins come from the histogram of the values;
            # zeros read bin 0 from entry 0 of the tables.
            for k in range(m):
                hist[np.int64(vals[k])] += 1
            _quantile_edges(q, m, largest, True, hist, vals, cursors, edges)
            e = 0
            for v in range(1, top + 1):
                if hist[v] != 0:
                    fv = np.float64(v)
                    while e < n_edges and edges[e] < fv:
                        e += 1
                    below = e
                    while e < n_edges and edges[e] <= fv:
                        e += 1
                    value_bin[v] = e
                    value_span[v] = e - below
                    hist[v] = 0
            if random:
                for i in range(start, end):
                    v = np.int64(data[i])
                    at_or_below = np.int64(value_bin[v])
                    span = np.int64(value_span[v])
                    out[i] = at_or_below - ((np.int64(draws[i - start]) * span) >> 32)
            else:
                for i in range(start, end):
                    out[i] = value_bin[np.int64(data[i])]
        else:
            row = vals[:m]
            row.sort()
            _quantile_edges(q, m, row[m - 1], False, hist, row, cursors, edges)
            for i in range(start, end):
                x = np.float64(data[i])
                if x == 0.0:
                    out[i] = 0
                    continue
                at_or_below = _n_edges_at_or_below(edges, x)
                if random:
                    below = _n_edges_below(edges, x)
                    if below != at_or_below:
                        at_or_below = _tie_bin(draws[i - start], below, at_or_below)
                out[i] = at_or_below


@numba.njit(cache=True, nogil=True, parallel=True)
def _quantile_bins_parallel(indptr, data, q, out, n_chunks, random, seed, cell_ids):
    n_cells = indptr.shape[0] - 1
    for chunk in numba.prange(n_chunks):
        lo, hi = _chunk_bounds(n_cells, n_chunks, chunk)
        _quantile_bins_rows(indptr, data, q, lo, hi, out, random, seed, cell_ids)


@numba.njit(**_JIT)
def _tie_uniforms_rows(indptr, seed, cell_offset, out):
    draws = np.empty(_max_row_nnz(indptr, 0, indptr.shape[0] - 1), dtype=np.uint32)
    for cell in range(indptr.shape[0] - 1):
        start = indptr[cell]
        _draw_row(_cell_key(seed, cell_offset + cell), indptr[cell + 1] - start, draws)
        for i in range(start, indptr[cell + 1]):
            out[i] = np.float64(draws[i - start]) * _TWO_POW_M32


def _quantile_levels(n_bins: int) -> np.ndarray:
    if not 2 <= n_bins <= 256:
        raise ValueError(
            f"n_bins must be in [2, 256] (bin 0 is zero, non-zeros get 1..n_bins-1), got {n_bins}"
        )
    return np.linspace(0, 1, n_bins - 1)


def _check_tie_break(tie_break: str, seed: int | None, cell_offset: int) -> np.uint64:
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    if cell_offset < 0:
        raise ValueError(f"cell_offset must be >= 0, got {cell_offset}")
    if tie_break == "highest":
        return np.uint64(0)
    if seed is None:
        raise ValueError("tie_break='random' needs a seed (e.g. cellfoundry.seeds.derive_seed)")
    if not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return np.uint64(int(seed))


def quantile_bins_csr(
    indptr: np.ndarray,
    data: np.ndarray,
    n_bins: int,
    *,
    seed: int | None = None,
    cell_offset: int = 0,
    cell_ids: np.ndarray | None = None,
    tie_break: str = "random",
    parallel: bool = False,
) -> np.ndarray:
    """Bin each cell's non-zero counts into its own quantile bins, as scGPT does.

    Per cell, with ``v`` its non-zero values as float64 in row order and
    ``edges = np.quantile(v, np.linspace(0, 1, n_bins - 1))``, a value lies at or above
    ``hi = np.digitize(v, edges)`` edges and strictly above ``lo = np.digitize(v, edges,
    right=True)`` edges; ``hi - lo`` is the number of edges equal to it (quantile edges tie
    whenever a value fills several quantiles, e.g. the many counts of 1). Zeros (absent or
    stored) keep bin 0, non-zeros get 1..n_bins-1.

    - ``tie_break="random"`` (scGPT): the bin is ``ceil(u * (lo - hi) + hi)`` with ``u``
      uniform in [0, 1): uniform over ``lo + 1 .. hi`` among tied edges, ``hi`` otherwise.
      This is scGPT 0.2.4's ``Preprocessor`` (step 6, binning) and ``_digitize(x, bins,
      side="both")`` in ``scgpt/preprocess.py``, expression for expression; scGPT draws ``u``
      with ``np.random.rand``, here ``u`` is a counter-based hash (splitmix64) of ``seed``, the
      cell's index in its file (``cell_offset`` + row) and the entry's position in the row
      (:func:`tie_uniforms` returns them), a multiple of 2**-32 so that the expression is
      exact. So the bins are reproducible, and identical whether a file is binned whole or in
      blocks of any size, serially or in parallel. On the real pbmc1k file (51 bins) the
      share per bin and the mean bin agree with scGPT's own draws within sampling error
      (``tests/test_discretize.py``).
    - ``tie_break="highest"``: ``hi``, the highest of the tied bins (``np.digitize``), with
      no randomness: every count equal to the cell's minimum goes to the top of its tie.

    Bins depend only on the order of a cell's values and on where the edges fall between
    them, so an increasing per-cell transform leaves them unchanged up to rounding corner
    cases: binning raw counts matches scGPT binning ``log1p`` of normalized counts (identical
    on 3,000 synthetic cells at 11, 51 and 256 bins).

    Rows of integer counts are binned from a histogram of their values (a counting sort);
    other rows (large or non-integer values) are sorted. Both give the same bins.

    Parameters
    ----------
    indptr, data
        CSR arrays of a cells x genes count matrix (or a block of consecutive cells of one);
        column indices are not needed.
    n_bins
        Number of bins including the zero bin, 2 to 256.
    seed
        Seed of the tie-break, an integer in [0, 2**64); required for ``"random"``. The shard
        stage derives it from the config's seed and the dataset and file.
    cell_offset
        Index, within its file, of the first cell of this block.
    cell_ids
        Instead of ``cell_offset``: each row's index within its file (int64, one per row),
        for blocks of cells that are not consecutive (the cells kept by QC).
    tie_break
        ``"random"`` (scGPT's rule) or ``"highest"``.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    One uint8 bin per entry of ``data``.

    Raises
    ------
    ValueError
        On malformed CSR arrays, ``n_bins`` out of range, an unknown ``tie_break``, or
        ``"random"`` without a seed.
    """
    indptr, _, data = _check_csr_arrays(indptr, None, data)
    q = _quantile_levels(n_bins)
    seed_u64 = _check_tie_break(tie_break, seed, cell_offset)
    random = tie_break == "random"
    out = np.empty(data.shape[0], dtype=np.uint8)
    n_cells = indptr.shape[0] - 1
    if cell_ids is None:
        cell_ids = np.arange(int(cell_offset), int(cell_offset) + n_cells, dtype=np.int64)
    cell_ids = np.ascontiguousarray(cell_ids, dtype=np.int64)
    if cell_ids.shape != (n_cells,) or (n_cells and cell_ids.min() < 0):
        raise ValueError(f"cell_ids must hold {n_cells} non-negative indices")
    if parallel:
        _quantile_bins_parallel(
            indptr, data, q, out, _n_chunks(n_cells), random, seed_u64, cell_ids
        )
    else:
        _quantile_bins_rows(indptr, data, q, 0, n_cells, out, random, seed_u64, cell_ids)
    return out


def quantile_bins(
    X: sp.csr_matrix | sp.csr_array,
    n_bins: int,
    *,
    seed: int | None = None,
    cell_offset: int = 0,
    tie_break: str = "random",
    parallel: bool = False,
) -> np.ndarray:
    """Bin each cell's non-zero counts into its own quantile bins, as scGPT does.

    See :func:`quantile_bins_csr` for the definition and the tie-break rules.

    Parameters
    ----------
    X
        Raw counts, cells x genes, CSR (a whole file or a block of consecutive cells).
    n_bins
        Number of bins including the zero bin, 2 to 256.
    seed
        Seed of the tie-break; required for ``"random"``.
    cell_offset
        Index, within its file, of the first cell of ``X``.
    tie_break
        ``"random"`` (scGPT's rule) or ``"highest"``.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    One uint8 bin per entry of ``X.data`` (same sparsity pattern as ``X``).
    """
    X = _as_csr(X)
    return quantile_bins_csr(
        X.indptr,
        X.data,
        n_bins,
        seed=seed,
        cell_offset=cell_offset,
        tie_break=tie_break,
        parallel=parallel,
    )


def tie_uniforms(indptr: np.ndarray, seed: int, *, cell_offset: int = 0) -> np.ndarray:
    """The uniforms that ``tie_break="random"`` draws, one per stored entry.

    Parameters
    ----------
    indptr
        CSR row offsets, as given to :func:`quantile_bins_csr`.
    seed, cell_offset
        As given to :func:`quantile_bins_csr`.

    Returns
    -------
    float64, ``indptr[-1]`` values in [0, 1), multiples of 2**-32: entry ``j`` of row ``r``
    gets a function of ``(seed, cell_offset + r, j)`` only. Only those of non-zeros are used.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    if indptr.ndim != 1 or indptr.size == 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must be a non-empty 1-d array, starting at 0, non-decreasing")
    seed_u64 = _check_tie_break("random", seed, cell_offset)
    out = np.empty(int(indptr[-1]), dtype=np.float64)
    _tie_uniforms_rows(indptr, seed_u64, int(cell_offset), out)
    return out


def scgpt_digitize(x: np.ndarray, bins: np.ndarray, rands: np.ndarray | None) -> np.ndarray:
    """scGPT 0.2.4's ``_digitize(x, bins, side="both")`` with its uniforms as an argument.

    Transcribed from ``scgpt/preprocess.py``; ``rands=None`` gives ``side="one"``
    (``np.digitize``, the highest of tied bins).

    Parameters
    ----------
    x
        1-d values to bin (one cell's non-zeros).
    bins
        Non-decreasing edges.
    rands
        One uniform in [0, 1) per value (scGPT draws ``np.random.rand(len(x))``), or None.

    Returns
    -------
    int64 bins, one per value.
    """
    assert x.ndim == 1 and bins.ndim == 1
    left_digits = np.digitize(x, bins)
    if rands is None:
        return left_digits
    right_digits = np.digitize(x, bins, right=True)
    digits = rands * (right_digits - left_digits) + left_digits
    return np.ceil(digits).astype(np.int64)


def quantile_bins_reference(
    X: sp.csr_matrix | sp.csr_array, n_bins: int, uniforms: np.ndarray | None = None
) -> np.ndarray:
    """Quantile bins computed as scGPT's ``Preprocessor`` does, one dense row at a time.

    The slow, faithful baseline: per cell, the dense row's non-zeros are binned with
    ``np.quantile`` edges and :func:`scgpt_digitize`.

    Parameters
    ----------
    X
        Raw counts, cells x genes, CSR with sorted indices and no duplicates.
    n_bins
        Number of bins including the zero bin, 2 to 256.
    uniforms
        One uniform per entry of ``X.data`` (e.g. from :func:`tie_uniforms`, or
        ``np.random.rand`` as scGPT draws them) for scGPT's random tie-break; None for the
        highest of tied bins.

    Returns
    -------
    One uint8 bin per entry of ``X.data``.
    """
    X = _as_csr(X)
    levels = _quantile_levels(n_bins)
    if uniforms is not None and np.shape(uniforms) != (X.nnz,):
        raise ValueError(f"uniforms has shape {np.shape(uniforms)} for {X.nnz} entries")
    out = np.zeros(X.nnz, dtype=np.uint8)
    for cell in range(X.shape[0]):
        start, end = X.indptr[cell], X.indptr[cell + 1]
        row = np.zeros(X.shape[1], dtype=np.float64)
        row[X.indices[start:end]] = X.data[start:end]
        nonzero = row.nonzero()
        values = row[nonzero]
        if values.size == 0:
            continue
        edges = np.quantile(values, levels)
        rands = None
        if uniforms is not None:
            dense_u = np.zeros(X.shape[1], dtype=np.float64)
            dense_u[X.indices[start:end]] = uniforms[start:end]
            rands = dense_u[nonzero]
        binned = np.zeros(X.shape[1], dtype=np.uint8)
        binned[nonzero] = scgpt_digitize(values, edges, rands)
        out[start:end] = binned[X.indices[start:end]]
    return out


# --------------------------------------------------------------------------------------------
# Geneformer-style rank-value encoding
# --------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _ranks_before(vals, genes, p, r):
    # The exact rank order: value descending, then gene index ascending.
    return vals[p] > vals[r] or (vals[p] == vals[r] and genes[p] < genes[r])


@numba.njit(**_JIT)
def _insertion_sort_run(keys, start, stop, pos_mask, vals, genes):
    for s in range(start + 1, stop):
        key = keys[s]
        p = key & pos_mask
        t = s - 1
        while t >= start and _ranks_before(vals, genes, p, keys[t] & pos_mask):
            keys[t + 1] = keys[t]
            t -= 1
        keys[t + 1] = key


@numba.njit(**_JIT)
def _fix_runs(keys, m, length, shift, pos_bits, vals, genes):
    # keys[:m] are ordered by key >> shift; put each run of equal (key >> shift), up to
    # `length`, into exact rank order. Runs hold values that agree on the sorted key bits:
    # mostly exact ties, which arrive in position (= gene) order and are only checked.
    pos_mask = (1 << pos_bits) - 1
    start = 0
    while start < length:
        prefix = keys[start] >> shift
        stop = start + 1
        while stop < m and (keys[stop] >> shift) == prefix:
            stop += 1
        ordered = True
        for s in range(start + 1, stop):
            if _ranks_before(vals, genes, keys[s] & pos_mask, keys[s - 1] & pos_mask):
                ordered = False
                break
        if not ordered:
            if stop - start <= _SMALL_RUN or shift == pos_bits:
                _insertion_sort_run(keys, start, stop, pos_mask, vals, genes)
            else:
                # Long unordered run: sort it by full key, then fix what that leaves equal.
                run = keys[start:stop]
                run.sort()
                sub = start
                while sub < stop:
                    sub_prefix = keys[sub] >> pos_bits
                    sub_stop = sub + 1
                    while sub_stop < stop and (keys[sub_stop] >> pos_bits) == sub_prefix:
                        sub_stop += 1
                    _insertion_sort_run(keys, sub, sub_stop, pos_mask, vals, genes)
                    sub = sub_stop
        start = stop


@numba.njit(**_JIT)
def _radix_scatter(src, dst, m, shift, counts):
    # One stable counting-sort pass on the digit at `shift`, given that digit's histogram;
    # False (nothing moved) when the digit is the same for all keys.
    mask = counts.shape[0] - 1
    if counts[(src[0] >> shift) & mask] == m:
        return False
    offset = 0
    for d in range(counts.shape[0]):
        c = counts[d]
        counts[d] = offset
        offset += c
    for i in range(m):
        d = (src[i] >> shift) & mask
        dst[counts[d]] = src[i]
        counts[d] += 1
    return True


@numba.njit(**_JIT)
def _sort_ranked(keys, spare, m, length, pos_bits, any_bits, all_bits, vals, genes, counts):
    # Sort keys[:m] into exact rank order, at least the first `length`; any_bits/all_bits are
    # the OR/AND of the keys. Returns the array (keys or spare) that holds the result.
    if m <= _SMALL_ROW:
        row = keys[:m]
        row.sort()
        _fix_runs(keys, m, length, pos_bits, pos_bits, vals, genes)
        return keys
    # Radix-sort on a window of two digits below the highest key bit that varies in this row,
    # then order what the window leaves equal: branch-free passes beat a comparison sort.
    varying = (any_bits ^ all_bits) >> pos_bits
    top = pos_bits
    while varying > 1:
        varying >>= 1
        top += 1
    low = max(pos_bits, top - 2 * _RADIX_BITS + 1)
    high = low + _RADIX_BITS
    mask = (1 << _RADIX_BITS) - 1
    counts[:] = 0
    for i in range(m):
        key = keys[i]
        counts[0, (key >> low) & mask] += 1
        counts[1, (key >> high) & mask] += 1
    src = keys
    dst = spare
    if _radix_scatter(src, dst, m, low, counts[0]):
        src, dst = dst, src
    if high <= top and _radix_scatter(src, dst, m, high, counts[1]):
        src, dst = dst, src
    _fix_runs(src, m, length, low, pos_bits, vals, genes)
    return src


@numba.njit(**_JIT)
def _rank_rows(
    indptr,
    indices,
    data,
    total_counts,
    gene_median,
    max_len,
    target_sum,
    slots,
    lengths,
    out,
    lo,
    hi,
):
    # Ranks cells lo..hi into out[slots[cell]:], slots sized min(nnz, max_len) per cell;
    # lengths[cell] receives the number of genes kept. Returns the count of bad gene indices.
    n_var = gene_median.shape[0]
    longest = _max_row_nnz(indptr, lo, hi)
    vals = np.empty(longest, dtype=np.float64)
    bits = vals.view(np.int64)
    genes = np.empty(longest, dtype=np.int64)
    keys = np.empty(longest, dtype=np.int64)
    spare = np.empty(longest, dtype=np.int64)
    counts = np.empty((2, 1 << _RADIX_BITS), dtype=np.int32)
    # Key: the top bits of the positive float64 pattern (monotone in the value), inverted so
    # that ascending keys mean descending values, then the entry's position in the row, which
    # follows gene order in canonical CSR; _fix_runs makes the order exact where keys tie.
    pos_bits = 1
    while (1 << pos_bits) < longest:
        pos_bits += 1
    prefix_max = (1 << (63 - pos_bits)) - 1
    pos_mask = (1 << pos_bits) - 1
    n_bad = 0
    for cell in range(lo, hi):
        total = total_counts[cell]
        m = 0
        any_bits = 0
        all_bits = -1
        for i in range(indptr[cell], indptr[cell + 1]):
            gene = indices[i]
            if gene < 0 or gene >= n_var:
                n_bad += 1
                continue
            median = gene_median[gene]
            if not median > 0.0:
                continue
            # Geneformer's expression, in its order: count / n_counts * target_sum / median.
            v = np.float64(data[i]) / total * target_sum / median
            if v > 0.0:
                vals[m] = v
                genes[m] = gene
                key = ((prefix_max - (bits[m] >> pos_bits)) << pos_bits) | m
                keys[m] = key
                any_bits |= key
                all_bits &= key
                m += 1
        length = min(m, max_len)
        lengths[cell] = length
        if length == 0:
            continue
        ranked = _sort_ranked(
            keys, spare, m, length, pos_bits, any_bits, all_bits, vals, genes, counts
        )
        base = slots[cell]
        for r in range(length):
            out[base + r] = genes[ranked[r] & pos_mask]
    return n_bad


@numba.njit(**_JIT)
def _rank_slots(indptr, max_len):
    n_cells = indptr.shape[0] - 1
    slots = np.empty(n_cells + 1, dtype=np.int64)
    slots[0] = 0
    for cell in range(n_cells):
        slots[cell + 1] = slots[cell] + min(indptr[cell + 1] - indptr[cell], max_len)
    return slots


@numba.njit(**_JIT)
def _compact(slots, out_indptr, out):
    # Lengths are in out_indptr[1:]; turn them into offsets and move each cell's genes left
    # from its slot, in cell order, so that no cell is overwritten before it has moved.
    n_cells = slots.shape[0] - 1
    for cell in range(n_cells):
        length = out_indptr[cell + 1]
        start = out_indptr[cell]
        out_indptr[cell + 1] = start + length
        src = slots[cell]
        if src != start:
            for r in range(length):
                out[start + r] = out[src + r]


@numba.njit(**_JIT)
def _rank_order_serial(indptr, indices, data, total_counts, gene_median, max_len, target_sum):
    n_cells = indptr.shape[0] - 1
    slots = _rank_slots(indptr, max_len)
    out_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    out = np.empty(slots[n_cells], dtype=np.int32)
    n_bad = _rank_rows(
        indptr,
        indices,
        data,
        total_counts,
        gene_median,
        max_len,
        target_sum,
        slots,
        out_indptr[1:],
        out,
        0,
        n_cells,
    )
    _compact(slots, out_indptr, out)
    return out_indptr, out[: out_indptr[n_cells]], n_bad


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _rank_order_parallel(
    indptr, indices, data, total_counts, gene_median, max_len, target_sum, n_chunks
):
    n_cells = indptr.shape[0] - 1
    slots = _rank_slots(indptr, max_len)
    out_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    lengths = out_indptr[1:]
    out = np.empty(slots[n_cells], dtype=np.int32)
    n_bad = np.zeros(n_chunks, dtype=np.int64)
    for chunk in numba.prange(n_chunks):
        lo, hi = _chunk_bounds(n_cells, n_chunks, chunk)
        n_bad[chunk] = _rank_rows(
            indptr,
            indices,
            data,
            total_counts,
            gene_median,
            max_len,
            target_sum,
            slots,
            lengths,
            out,
            lo,
            hi,
        )
    _compact(slots, out_indptr, out)
    return out_indptr, out[: out_indptr[n_cells]], n_bad.sum()


def _check_rank_inputs(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    total_counts: np.ndarray,
    gene_median: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    indptr, indices, data = _check_csr_arrays(indptr, indices, data)
    total_counts = np.ascontiguousarray(total_counts, dtype=np.float64)
    gene_median = np.ascontiguousarray(gene_median, dtype=np.float64)
    if total_counts.shape != (indptr.shape[0] - 1,):
        raise ValueError(
            f"total_counts has shape {total_counts.shape} for {indptr.shape[0] - 1} cells"
        )
    if gene_median.ndim != 1 or gene_median.shape[0] >= 2**31:
        raise ValueError("gene_median must be 1-d with fewer than 2**31 genes")
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    return indptr, indices, data, total_counts, gene_median


def rank_order(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    total_counts: np.ndarray,
    gene_median: np.ndarray,
    max_len: int,
    target_sum: float = 10_000,
    *,
    parallel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank each cell's genes by scaled normalized expression, highest first (Geneformer).

    A gene's value in a cell is ``count / total_counts[cell] * target_sum / gene_median[gene]``,
    Geneformer's rank-value encoding (Theodoris et al. 2023, `TranscriptomeTokenizer`) in its
    floating-point order, so values are bit-identical to the tokenizer's. Genes without a
    positive median (zero or NaN: genes outside the vocabulary, or never seen in the corpus)
    and zero counts are dropped; the rest are sorted by value, descending, and the first
    ``max_len`` are kept. Equal values are ordered by ascending gene index: Geneformer's own
    ``np.argsort(-x)`` is an unstable quicksort whose tie order depends on the input layout,
    so it is replaced by this deterministic rule.

    Used both on whole datasets and by the shard loader on gathered batches: there is no
    Python loop over cells, and per call it allocates only the outputs (``out_indices`` is the
    used part of a buffer of ``min(nnz, max_len)`` slots per cell) and, per chunk of cells,
    scratch the size of the longest row.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of a cells x genes count matrix.
    total_counts
        Per-cell total counts over all genes (the normalization denominator).
    gene_median
        Per-gene non-zero median of normalized counts over the corpus; 0 excludes the gene.
        Its length is the number of genes.
    max_len
        Maximum number of genes kept per cell.
    target_sum
        Counts per cell after normalization.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    out_indptr
        int64, ``n_cells + 1`` offsets into ``out_indices``.
    out_indices
        int32 gene indices of each cell in rank order.
    """
    indptr, indices, data, total_counts, gene_median = _check_rank_inputs(
        indptr, indices, data, total_counts, gene_median, max_len
    )
    if parallel:
        n_chunks = _n_chunks(indptr.shape[0] - 1)
        out_indptr, out_indices, n_bad = _rank_order_parallel(
            indptr,
            indices,
            data,
            total_counts,
            gene_median,
            max_len,
            float(target_sum),
            n_chunks,
        )
    else:
        out_indptr, out_indices, n_bad = _rank_order_serial(
            indptr, indices, data, total_counts, gene_median, max_len, float(target_sum)
        )
    if n_bad:
        raise ValueError(f"{n_bad} column indices are outside [0, {gene_median.shape[0]})")
    return out_indptr, out_indices


def rank_order_matrix(
    X: sp.csr_matrix | sp.csr_array,
    gene_median: np.ndarray,
    max_len: int,
    *,
    total_counts: np.ndarray | None = None,
    target_sum: float = 10_000,
    parallel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank each cell's genes of a count matrix, Geneformer style; see :func:`rank_order`.

    Parameters
    ----------
    X
        Raw counts, cells x genes, CSR.
    gene_median
        Per-gene non-zero median of normalized counts; 0 excludes the gene.
    max_len
        Maximum number of genes kept per cell.
    total_counts
        Per-cell normalization totals; by default the row sums of ``X``.
    target_sum
        Counts per cell after normalization.
    parallel
        Split cells over numba's thread pool.

    Returns
    -------
    out_indptr, out_indices
        Gene indices of each cell in rank order, as CSR offsets and int32 values.
    """
    X = _as_csr(X)
    if len(gene_median) != X.shape[1]:
        raise ValueError(f"gene_median has {len(gene_median)} entries for {X.shape[1]} genes")
    if total_counts is None:
        total_counts = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    return rank_order(
        X.indptr,
        X.indices,
        X.data,
        total_counts,
        gene_median,
        max_len,
        target_sum,
        parallel=parallel,
    )


def rank_order_reference(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    total_counts: np.ndarray,
    gene_median: np.ndarray,
    max_len: int,
    target_sum: float = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank order computed with numpy, one cell at a time (the faithful baseline).

    Each cell's entries are put in gene order and ranked with ``np.argsort(-values,
    kind="stable")``, so ties go to the lower gene index, as in :func:`rank_order`.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of a cells x genes count matrix.
    total_counts
        Per-cell normalization totals.
    gene_median
        Per-gene non-zero median; 0 excludes the gene.
    max_len
        Maximum number of genes kept per cell.
    target_sum
        Counts per cell after normalization.

    Returns
    -------
    out_indptr, out_indices
        Gene indices of each cell in rank order, as CSR offsets and int32 values.
    """
    indptr, indices, data, total_counts, gene_median = _check_rank_inputs(
        indptr, indices, data, total_counts, gene_median, max_len
    )
    n_cells = indptr.shape[0] - 1
    out_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    ranked = []
    for cell in range(n_cells):
        start, end = indptr[cell], indptr[cell + 1]
        genes = indices[start:end]
        in_gene_order = np.argsort(genes, kind="stable")
        genes = genes[in_gene_order]
        counts = data[start:end][in_gene_order].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = counts / total_counts[cell] * target_sum / gene_median[genes]
        keep = (values > 0) & (gene_median[genes] > 0)
        genes, values = genes[keep], values[keep]
        top = np.argsort(-values, kind="stable")[:max_len]
        ranked.append(genes[top].astype(np.int32))
        out_indptr[cell + 1] = out_indptr[cell] + top.size
    out_indices = np.concatenate(ranked) if ranked else np.zeros(0, dtype=np.int32)
    return out_indptr, out_indices
