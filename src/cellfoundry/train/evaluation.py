"""Evaluation during training: do the model's cell embeddings carry cell identity?

Every `eval.every_n_steps` optimizer steps (and at the first and last step), the callback
embeds a seeded subsample of each evaluation dataset's cells with the model being trained
(through `cellfoundry.inference.embed_with`, the path `cellfoundry embed-cells` takes) and
computes scIB's label and batch metrics (`cellfoundry.metrics`), beside the same metrics of a
PCA of the highly variable genes of log-normalised counts computed once. Metrics go to every
logger under `eval/<dataset>/<metric>` (baseline: `eval/<dataset>/<metric>_pca`), with the
cost in seconds.

Cells are read bounded: only the sampled rows of a dataset's memory-mapped shards (or of a
held-out h5ad file, through h5py) plus its label and batch columns, never a whole matrix.
With several ranks, rank 0 evaluates while the others wait at a barrier; nothing else is
communicated, and no global random state is consumed, so training is unchanged.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import lightning as L
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback

from cellfoundry.errors import ConfigError
from cellfoundry.metrics import embedding_metrics, pca_baseline
from cellfoundry.seeds import derive_seed

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
# obs columns that name batches; with none, a dataset of several files uses the file.
BATCH_KEYS = ("batch", "donor_id", "sample_id", "sample", "donor")
FILE = "file"  # batch_key naming the file (shard) a cell comes from
EMBED_BATCH = 256  # cells per forward pass


@dataclass(frozen=True)
class EvalSet:
    """One evaluation dataset: where its cells are and which obs columns label them.

    Attributes
    ----------
    name
        Name in metric keys (`eval/<name>/...`): the dataset, or the held-out file's stem.
    species
        Species of its genes.
    shards
        Shard folders of a dataset of the corpus (empty for a held-out file).
    h5ad
        A held-out preprocessed h5ad (raw counts in X, Ensembl IDs as var_names), or None.
    label_key
        obs column of cell labels.
    batch_key
        obs column of batches, `file` for the file a cell comes from, or None.
    """

    name: str
    species: str
    shards: tuple[Path, ...]
    h5ad: Path | None
    label_key: str
    batch_key: str | None


def _label_key_of(columns: dict[str, pd.Series]) -> str | None:
    for key in LABEL_KEYS:
        if key in columns and 2 <= columns[key].nunique() <= 200:
            return key
    return None


def _shard_columns(shards: tuple[Path, ...], keys: list[str]) -> dict[str, pd.Series]:
    """The named obs columns present in every shard, over all of them (one column each read)."""
    schemas = [pl.read_parquet_schema(s / "obs.parquet") for s in shards]
    present = [k for k in keys if all(k in schema for schema in schemas)]
    if not present:
        return {}
    frame = pl.concat(
        [pl.read_parquet(s / "obs.parquet", columns=present).cast(pl.Utf8) for s in shards]
    )
    return {k: frame[k].to_pandas() for k in present}


def _h5ad_columns(path: Path, keys: list[str]) -> dict[str, pd.Series]:
    """The named obs columns of an h5ad (each read alone)."""
    out = {}
    with h5py.File(path, "r") as f:
        for key in keys:
            if key in f["obs"]:
                values = ad.io.read_elem(f["obs"][key])
                out[key] = pd.Series(np.asarray(values, dtype=object)).astype(str)
    return out


def resolve(
    settings: dict[str, Any], manifest: str | Path, *, species: dict[str, str] | None = None
) -> list[EvalSet]:
    """The evaluation datasets of the `eval` settings.

    `datasets: auto` takes each dataset of the shard manifest with a label column
    (`LABEL_KEYS`, 2-200 distinct values), sorted by name, at most `max_datasets`; its batch
    key is the first of `BATCH_KEYS` present, else `file` when it has several files. A
    listed dataset must be in the manifest; a listed file must be a preprocessed h5ad.

    Raises
    ------
    ConfigError
        A listed dataset that the manifest lacks, a file that does not exist or without a
        species, a label or batch column that is missing, or a dataset without labels.
    """
    table = pl.read_parquet(manifest).unique(["dataset", "file"]).sort("dataset", "file")
    shards = {
        d: tuple(Path(p) for p in g["shard"].to_list())
        for (d,), g in table.group_by(["dataset"], maintain_order=True)
    }
    species_of = dict(zip(table["dataset"], table["species"], strict=True))
    entries = settings["datasets"]
    automatic = entries == "auto"
    if automatic:
        entries = [{"dataset": d, "label_key": None, "batch_key": None} for d in sorted(shards)]
    found: list[EvalSet] = []
    for entry in entries:
        if automatic and len(found) >= settings["max_datasets"]:
            log.info(
                "evaluation: %d datasets (max_datasets); the others are not evaluated", len(found)
            )
            break
        label_key, batch_key = entry.get("label_key"), entry.get("batch_key")
        if "dataset" in entry:
            name = entry["dataset"]
            if name not in shards:
                raise ConfigError(
                    f"eval.datasets: dataset '{name}' is not in the shard manifest {manifest} "
                    f"(it has {', '.join(sorted(shards))})"
                )
            where: tuple[Path, ...] | Path = shards[name]
            source = f"dataset '{name}'"
            columns = _shard_columns(
                shards[name], [*LABEL_KEYS, *BATCH_KEYS, *filter(None, [label_key, batch_key])]
            )
            n_files, kind = len(shards[name]), species_of[name]
        else:
            path = Path(entry["file"])
            name = entry.get("name") or path.stem
            source = f"file {path}"
            if not path.is_file():
                raise ConfigError(f"eval.datasets: {source} does not exist")
            kind = entry.get("species") or _h5ad_species(path)
            if kind is None:
                raise ConfigError(
                    f"eval.datasets: {source}: give its species (the file has no "
                    "uns['cellfoundry']['species'])"
                )
            where = path
            columns = _h5ad_columns(
                path, [*LABEL_KEYS, *BATCH_KEYS, *filter(None, [label_key, batch_key])]
            )
            n_files = 1
        if label_key is None:
            label_key = _label_key_of(columns)
            if label_key is None:
                if automatic:
                    continue
                raise ConfigError(
                    f"eval.datasets: {source} has no label column ({', '.join(LABEL_KEYS)}); "
                    "name one with label_key"
                )
        elif label_key not in columns:
            raise ConfigError(
                f"eval.datasets: {source} has no obs column '{label_key}' (label_key)"
            )
        if batch_key is None and automatic:
            batch_key = next(
                (k for k in BATCH_KEYS if k in columns and 2 <= columns[k].nunique() <= 100),
                FILE if n_files > 1 else None,
            )
        elif batch_key not in (None, FILE) and batch_key not in columns:
            raise ConfigError(
                f"eval.datasets: {source} has no obs column '{batch_key}' (batch_key)"
            )
        found.append(
            EvalSet(
                name=name,
                species=kind,
                shards=where if isinstance(where, tuple) else (),
                h5ad=where if isinstance(where, Path) else None,
                label_key=label_key,
                batch_key=batch_key,
            )
        )
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.datasets: names used twice: {', '.join(names)}")
    return found


def _h5ad_species(path: Path) -> str | None:
    with h5py.File(path, "r") as f:
        node = f.get("uns/cellfoundry/species")
        if node is None:
            return None
        value = node[()]
        return value.decode() if isinstance(value, bytes) else str(value)


def sample_cells(spec: EvalSet, n_cells: int, *, seed: int) -> ad.AnnData:
    """A seeded subsample of the labelled cells of an evaluation dataset, read bounded.

    Returns an AnnData of at most `n_cells` cells in file order: raw counts in X (CSR, the
    union of the files' genes), Ensembl IDs as var_names, obs `label`, `batch` (when the set
    has a batch key) and `total_counts`. Cells without a label are never drawn (counted in
    the log). The draw depends only on `seed`, the set's name and its cells.
    """
    if spec.h5ad is not None:
        files = [spec.h5ad]
        columns = _h5ad_columns(spec.h5ad, _keys(spec))
        sizes = [len(columns[spec.label_key])]
    else:
        files = list(spec.shards)
        columns = _shard_columns(spec.shards, _keys(spec))
        sizes = [int(np.load(s / "indptr.npy", mmap_mode="r").shape[0]) - 1 for s in files]
    labels = columns[spec.label_key].to_numpy(dtype=object)
    labelled = ~pd.isna(labels) & ~np.isin(labels.astype(str), ["", "nan", "None", "NA"])
    if not labelled.all():
        log.info(
            "evaluation %s: %d of %d cells have no '%s' and are not drawn",
            spec.name,
            int((~labelled).sum()),
            len(labels),
            spec.label_key,
        )
    candidates = np.flatnonzero(labelled)
    rng = np.random.default_rng(derive_seed(seed, "eval", spec.name))
    chosen = np.sort(rng.choice(candidates, size=min(n_cells, len(candidates)), replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, file in enumerate(files):
        rows = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        if len(rows) == 0:
            continue
        part = (
            _read_h5ad_rows(file, rows) if spec.h5ad is not None else _read_shard_rows(file, rows)
        )
        part.obs_names = [f"{file.name}:{r}" for r in rows]
        part.obs[FILE] = file.stem
        parts.append(part)
    adata = ad.concat(parts, join="outer", merge="first") if len(parts) > 1 else parts[0]
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    adata.obs["label"] = labels[chosen].astype(str)
    if spec.batch_key == FILE:
        adata.obs["batch"] = adata.obs[FILE].astype(str).to_numpy()
    elif spec.batch_key is not None:
        adata.obs["batch"] = columns[spec.batch_key].to_numpy(dtype=object)[chosen].astype(str)
    return adata


def _keys(spec: EvalSet) -> list[str]:
    return [k for k in (spec.label_key, spec.batch_key) if k not in (None, FILE)]


def _read_shard_rows(shard: Path, rows: np.ndarray) -> ad.AnnData:
    """Rows of a shard (sorted local indices) from its memory-mapped arrays."""
    indptr = np.load(shard / "indptr.npy", mmap_mode="r")
    starts, stops = np.asarray(indptr[rows]), np.asarray(indptr[rows + 1])
    lengths = stops - starts
    entries = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    entries = entries + np.arange(int(lengths.sum()))
    records = np.asarray(np.load(shard / "entries.npy", mmap_mode="r")[entries])
    indices, counts = records["gene"], records["count"]
    var = pl.read_parquet(shard / "var.parquet")
    X = sp.csr_matrix(
        (counts, indices, np.concatenate([[0], np.cumsum(lengths)])),
        shape=(len(rows), var.height),
    )
    total = np.asarray(np.load(shard / "total_counts.npy", mmap_mode="r")[rows])
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame({"total_counts": total}, index=rows.astype(str)),
        var=pd.DataFrame(index=pd.Index(var["gene_id"].to_list())),
    )


def _read_h5ad_rows(path: Path, rows: np.ndarray) -> ad.AnnData:
    """Rows of a preprocessed h5ad (sorted indices): X rows, var names, total counts."""
    with h5py.File(path, "r") as f:
        X = f["X"]
        if not isinstance(X, h5py.Group):
            raise ConfigError(
                f"eval.datasets: {path}: X is dense; expected a preprocessed h5ad (CSR raw counts)"
            )
        matrix = ad.io.sparse_dataset(X)[rows]
        var = ad.io.read_elem(f["var"])
        obs = pd.DataFrame(index=np.arange(len(rows)).astype(str))
        if "total_counts" in f["obs"]:
            obs["total_counts"] = np.asarray(ad.io.read_elem(f["obs"]["total_counts"]))[rows]
    return ad.AnnData(
        X=sp.csr_matrix(matrix), obs=obs, var=pd.DataFrame(index=var.index.astype(str))
    )


@dataclass
class _Prepared:
    """An evaluation set's cells, read once, and its baseline metrics."""

    spec: EvalSet
    adata: ad.AnnData
    baseline: dict[str, float]
    seconds: float


class EmbeddingEvaluation(Callback):
    """Evaluates the cell embeddings of the model being trained (see the module docstring).

    Parameters
    ----------
    sets
        The evaluation datasets (`resolve`).
    settings
        The config's `eval` section (`every_n_steps`, `n_cells`, `k`, `baseline`).
    seed
        The global seed; the subsample of a set and the metrics' folds derive from it.
    """

    def __init__(self, sets: list[EvalSet], settings: dict[str, Any], *, seed: int) -> None:
        self.sets, self.settings, self.seed = sets, settings, seed
        self.every = int(settings["every_n_steps"])
        self._prepared: list[_Prepared] | None = None
        self._last_step: int | None = None
        self.total_seconds = 0.0
        self.disabled = False

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            # A forward pass of a sharded model needs every rank; rank 0 alone would hang.
            self.disabled = True
            log.warning("evaluation is off under FSDP (the model is sharded over the ranks)")
        elif trainer.global_step == 0:
            self._evaluate(trainer, module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if not self.disabled and step % self.every == 0 and step != self._last_step:
            self._evaluate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.disabled and trainer.global_step != self._last_step:
            self._evaluate(trainer, module)
        if trainer.is_global_zero:
            log.info("evaluation took %.1f s in all", self.total_seconds)

    def _evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Rank 0 evaluates; every rank then meets at one barrier (the same on all ranks)."""
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            self._evaluate_here(trainer, module)
        if trainer.world_size > 1:
            trainer.strategy.barrier("cellfoundry-eval")

    def _evaluate_here(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from cellfoundry.inference import LoadedModel, embed_with

        step = trainer.global_step
        started = time.perf_counter()
        # Nothing here may touch the random streams training draws from.
        numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
        with torch.random.fork_rng(devices=[]):
            prepared = self._prepare()
            data = trainer.datamodule
            loaded = LoadedModel(
                model=module.model,
                layout=data.layout,
                mappings=data.mappings,
                objective=module.objective,
                device=module.device,
                n_bins=module.model.config.n_bins,
                medians=data.medians,
            )
            was_training = module.model.training
            module.model.eval()
            metrics: dict[str, float] = {}
            try:
                for item in prepared:
                    begun = time.perf_counter()
                    spec, adata = item.spec, item.adata
                    z = embed_with(loaded, adata, species=spec.species, batch_size=EMBED_BATCH)
                    values = embedding_metrics(
                        z,
                        adata.obs["label"].to_numpy(),
                        adata.obs["batch"].to_numpy() if "batch" in adata.obs else None,
                        k=self.settings["k"],
                        seed=derive_seed(self.seed, "eval", spec.name) % 2**32,
                    )
                    seconds = time.perf_counter() - begun
                    metrics |= {f"eval/{spec.name}/{m}": v for m, v in values.items()}
                    metrics |= {f"eval/{spec.name}/{m}_pca": v for m, v in item.baseline.items()}
                    metrics[f"eval/{spec.name}/seconds"] = seconds
                    log.info(
                        "step %d: eval %s (%d cells): %s (PCA %s), %.1f s",
                        step,
                        spec.name,
                        adata.n_obs,
                        ", ".join(f"{m} {v:.3f}" for m, v in values.items()),
                        ", ".join(f"{v:.3f}" for v in item.baseline.values()),
                        seconds,
                    )
            finally:
                module.model.train(was_training)
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
        elapsed = time.perf_counter() - started
        self.total_seconds += elapsed
        metrics["eval/seconds"] = elapsed
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def _prepare(self) -> list[_Prepared]:
        """Read each set's cells and compute its baseline, once per process."""
        if self._prepared is None:
            self._prepared = []
            baseline = self.settings["baseline"]
            for spec in self.sets:
                begun = time.perf_counter()
                adata = sample_cells(spec, self.settings["n_cells"], seed=self.seed)
                values = embedding_metrics(
                    pca_baseline(
                        adata,
                        n_top_genes=baseline["n_top_genes"],
                        n_components=baseline["n_components"],
                        seed=derive_seed(self.seed, "eval", spec.name) % 2**32,
                    ),
                    adata.obs["label"].to_numpy(),
                    adata.obs["batch"].to_numpy() if "batch" in adata.obs else None,
                    k=self.settings["k"],
                    seed=derive_seed(self.seed, "eval", spec.name) % 2**32,
                )
                seconds = time.perf_counter() - begun
                log.info(
                    "evaluation %s: %d cells (labels '%s'%s), PCA baseline in %.1f s",
                    spec.name,
                    adata.n_obs,
                    spec.label_key,
                    f", batches '{spec.batch_key}'" if spec.batch_key else "",
                    seconds,
                )
                self._prepared.append(_Prepared(spec, adata, values, seconds))
        return self._prepared


def evaluation_callbacks(
    settings: dict[str, Any] | None, manifest: str | Path, *, seed: int
) -> list[Callback]:
    """The evaluation callback of the config's `eval` section ([] when off or nothing to
    evaluate). Every rank resolves the sets, so a bad setting fails all ranks alike."""
    if not settings or not settings["enabled"]:
        return []
    sets = resolve(settings, manifest)
    if not sets:
        log.info("evaluation: no dataset with cell labels; nothing to evaluate")
        return []
    return [EmbeddingEvaluation(sets, settings, seed=seed)]
