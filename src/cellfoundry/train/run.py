"""Run a training: the run's identity and resume point, the data module, the system, the
Lightning Trainer, then the export.

Devices and nodes are arguments (the Snakemake rule takes them from its resources, i.e. from
the profile), never part of the science settings. Under Slurm, Lightning's SLURMEnvironment
picks up ranks from `srun`, and `SlurmRequeue` checkpoints and requeues on SIGUSR1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from cellfoundry.config import schema_default
from cellfoundry.errors import CellfoundryError, ConfigError
from cellfoundry.io import read_json
from cellfoundry.models.encoder import EncoderConfig
from cellfoundry.models.model import ModelConfig
from cellfoundry.reference import read_reference
from cellfoundry.seeds import derive_seed
from cellfoundry.train.data import (
    ShardDataModule,
    VocabularyLayout,
    n_cells,
    read_medians,
    restrict_genes,
    specials_for,
)
from cellfoundry.train.evaluation import evaluation_callbacks
from cellfoundry.train.export import export_model, gene_embedding_matrix, publish
from cellfoundry.train.identity import (
    RunIdentity,
    is_global_zero,
    prepare_run_dir,
    run_identity,
    wait_for_run_dir,
)
from cellfoundry.train.objectives import make_objective
from cellfoundry.train.system import OptimizerConfig, PretrainingSystem
from cellfoundry.vocabulary import TokenMapping, read_token_mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    """Files a training reads (all produced by the pipeline), by species."""

    manifest: Path
    token_mappings: dict[str, Path]
    summaries: dict[str, Path]
    gene_embeddings: dict[str, Path]
    panels: dict[str, dict[str, Path]] = field(default_factory=dict)
    references: dict[str, Path] = field(default_factory=dict)


def precision_for(setting: str) -> str:
    """`auto`: bf16 mixed precision on CUDA, full fp32 on CPU."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def panel_tokens(
    panels: dict[str, dict[str, Path]],
    layout: VocabularyLayout,
    mappings: dict[str, Any],
    names: list[str] | None,
) -> dict[str, list[np.ndarray]]:
    """Per species, the named panels (all when None) as arrays of model token ids; genes
    outside the vocabulary are dropped."""
    out: dict[str, list[np.ndarray]] = {}
    for species, files in panels.items():
        arrays = []
        for name in names or sorted(files):
            if name in files:
                local = mappings[species].tokens(pl.read_csv(files[name])["Ensembl_ID"].to_list())
                arrays.append(np.sort(layout.local_to_global[species][local[local >= 0]]))
        out[species] = arrays
    return out


def make_training_objective(
    settings: dict[str, Any],
    n_bins: int,
    panels: dict[str, dict[str, Path]],
    layout: VocabularyLayout,
    mappings: dict[str, Any],
) -> Any:
    """The objective of the `train` settings (contrastive: all panels by default; diffusion: hvg)."""
    name = settings["objective"]
    default = None if name == "contrastive" else ["hvg"]
    chosen = (
        panel_tokens(panels, layout, mappings, settings["panels"] or default)
        if name in ("contrastive", "diffusion")
        else {}
    )
    return make_objective(
        name,
        max_len=settings["model"]["max_len"],
        n_bins=n_bins,
        mask_ratio=settings["mask_ratio"],
        gene_selection=settings["gene_selection"],
        padding_free=settings["padding_free"],
        panels=chosen,
        panel_max_drop_rate=settings["panel_max_drop_rate"],
        # .get: the settings of exports written before these options lack them.
        views=settings.get("contrastive_views", schema_default("train.contrastive_views")),
        center=settings.get("contrastive_center", schema_default("train.contrastive_center")),
        keep_min=settings.get("contrastive_keep_min", schema_default("train.contrastive_keep_min")),
        rank=settings.get("contrastive_rank", schema_default("train.contrastive_rank")),
        view_len=settings.get("contrastive_view_len", schema_default("train.contrastive_view_len")),
        input_layout=settings.get("input_layout", "cls"),
    )


# ----------------------------------------------------------------------------- build


def read_vocabularies(
    settings: dict[str, Any], inputs: TrainInputs
) -> tuple[dict[str, TokenMapping], VocabularyLayout]:
    """The species' token mappings (restricted to `gene_types` when set) and the model's layout."""
    mappings = {s: read_token_mapping(s, p) for s, p in inputs.token_mappings.items()}
    gene_types = settings.get("gene_types")
    if gene_types:
        for species, mapping in sorted(mappings.items()):
            if species not in inputs.references:
                raise ConfigError(
                    f"train.gene_types needs the {species} gene reference (--references)"
                )
            reference = read_reference(species, inputs.references[species]).table
            try:
                mappings[species] = restrict_genes(
                    mapping, reference, gene_types, source=str(inputs.references[species])
                )
            except ValueError as error:
                raise ConfigError(str(error)) from error
            log.info(
                "%s: %d of %d genes of the token mapping have gene_type %s",
                species,
                mappings[species].gene_table.height,
                mapping.gene_table.height,
                " or ".join(gene_types),
            )
    specials = specials_for(settings.get("input_layout", "cls"))
    return mappings, VocabularyLayout.from_mappings(mappings, specials=specials)


def read_n_bins(manifest: Path) -> int:
    """The value bins of the shards, from each dataset's shard manifest; all must agree."""
    found: dict[int, str] = {}
    for shard in pl.read_parquet(manifest).unique("dataset", keep="first")["shard"].to_list():
        dataset_manifest = Path(shard).parent / "manifest.json"
        source = dataset_manifest if dataset_manifest.is_file() else Path(shard) / "shard.json"
        found.setdefault(int(read_json(source)["n_bins"]), str(source))
    if len(found) != 1:
        raise CellfoundryError(
            "shards disagree on n_bins: "
            + ", ".join(f"{n} in {source}" for n, source in sorted(found.items()))
        )
    return next(iter(found))


def model_config(
    settings: dict[str, Any],
    layout: VocabularyLayout,
    objective: Any,
    n_bins: int,
    gene_embedding_dim: int | None,
) -> ModelConfig:
    """The architecture the settings describe, over the layout's vocabulary."""
    model = settings["model"]
    encoder = EncoderConfig(
        vocab_size=layout.n_tokens,
        d_model=model["d_model"],
        n_layers=model["n_layers"],
        n_heads=model["n_heads"],
        d_ff=model["d_ff"],
        dropout=model["dropout"],
        attention_dropout=model["attention_dropout"],
        max_len=model["max_len"],
        norm_first=model["norm_first"],
        activation=model["activation"],
        layer_norm_eps=1e-12 if not model["norm_first"] else 1e-5,
        pad_token_id=layout.pad_id,
        gene_embedding_dim=gene_embedding_dim,
        gradient_checkpointing=model["gradient_checkpointing"],
        **objective.model_options(),
    )
    name = settings["objective"]
    # The binned model's cell embedding is its <cls> output, trained by the GEPC head.
    cell_head = name == "binned_mlm" and settings["cell_objective"]
    return ModelConfig(
        objective=name,
        encoder=encoder,
        n_bins=n_bins,
        pooling=settings["pooling"],
        cell_head=cell_head,
        temperature=settings["temperature"],
    )


def optimizer_config(settings: dict[str, Any]) -> OptimizerConfig:
    return OptimizerConfig(
        **{**settings["optimizer"], "betas": tuple(settings["optimizer"]["betas"])},
        max_steps=settings["max_steps"],
    )


def build(
    settings: dict[str, Any], inputs: TrainInputs, *, seed: int
) -> tuple[PretrainingSystem, ShardDataModule, VocabularyLayout]:
    """The system and data module of a training (no Trainer)."""
    mappings, layout = read_vocabularies(settings, inputs)
    n_bins = read_n_bins(inputs.manifest)
    objective = make_training_objective(settings, n_bins, inputs.panels, layout, mappings)
    gene_embeddings = None
    if inputs.gene_embeddings:
        matrix, found = gene_embedding_matrix(layout, mappings, inputs.gene_embeddings)
        log.info(
            "gene embeddings (%d dims) for %s",
            matrix.shape[1],
            ", ".join(f"{s}: {n} genes" for s, n in found.items()),
        )
        gene_embeddings = torch.from_numpy(matrix)
    config = model_config(
        settings,
        layout,
        objective,
        n_bins,
        None if gene_embeddings is None else gene_embeddings.shape[1],
    )
    system = PretrainingSystem(
        config,
        objective,
        optimizer_config(settings),
        gene_embeddings,
        seed=derive_seed(seed, "dropout"),
    )
    data = ShardDataModule(
        inputs.manifest,
        mappings,
        objective.collate,
        batch_size=settings["batch_size"],
        seed=derive_seed(seed, "train"),
        within_dataset=objective.within_dataset,
        length_grouped=settings["length_grouped"],
        # .get: the settings of exports written before this option lack it.
        dataset_alpha=settings.get("dataset_alpha", schema_default("train.dataset_alpha")),
        val_batches=settings["val_batches"],
        num_workers=settings["num_workers"],
        medians=read_medians(list(inputs.summaries.values())) if inputs.summaries else None,
        specials=layout.specials,
    )
    return system, data, layout


# ----------------------------------------------------------------------------- the Trainer


class PeriodicCheckpoints(ModelCheckpoint):
    """`ModelCheckpoint` every n steps, keeping the newest `keep_checkpoints`; on resume it
    forgets checkpoints that were moved aside (`identity.prepare_run_dir`)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        kept = {p: v for p, v in self.best_k_models.items() if Path(p).exists()}
        if kept != self.best_k_models:
            self.best_k_models = kept
            self.kth_best_model_path = min(kept, key=kept.get) if kept else ""
            self.kth_value = kept[self.kth_best_model_path] if kept else self.kth_value
            self.best_model_path = max(kept, key=kept.get) if kept else ""
            self.best_model_score = kept[self.best_model_path] if kept else None


class DecayStartCheckpoint(Callback):
    """Saves `checkpoints/decay-start-step<N>.ckpt` at the step where the wsd schedule starts
    decaying (kept whatever `keep_checkpoints` says): a longer run continues from it."""

    def __init__(self, run_dir: Path, optimizer: OptimizerConfig) -> None:
        self.path = run_dir / "checkpoints" / f"decay-start-step{optimizer.decay_start:07d}.ckpt"
        self.step = optimizer.decay_start
        self.pending = optimizer.schedule == "wsd" and 0 < self.step < optimizer.max_steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Decided alike on every rank: saving a checkpoint is a collective.
        if self.pending and trainer.global_step == self.step:
            self.pending = False
            trainer.save_checkpoint(self.path)


class SlurmRequeue(Callback):
    """Checkpoint and requeue on Slurm's warning signal, at a step boundary, all ranks together.

    `--signal=SIGUSR1@N` warns a job N seconds before its time limit. Lightning's own handler
    saves the checkpoint inside the signal handler, wherever each rank happens to be; with DDP
    one rank can then wait in the checkpoint's barrier while another waits in a gradient
    all-reduce, and the job hangs until it is killed. Here the handler only raises a flag; after
    every training step the ranks agree on it (a one-element all-reduce), all save
    `hpc_ckpt_<step>.ckpt` together, rank 0 calls `scontrol requeue`, and the ranks wait for
    Slurm to stop them. The requeued job resumes from that checkpoint (`newest_checkpoint`).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.requested = False
        signal.signal(signal.SIGUSR1, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        flag = torch.tensor([float(self.requested)], device=module.device)
        if trainer.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return
        path = self.run_dir / f"hpc_ckpt_{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        requeued = torch.tensor([0.0], device=module.device)
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            result = subprocess.call(["scontrol", "requeue", job])
            requeued.fill_(float(result == 0))
            log.info(
                "saved %s on Slurm's signal; requeue of job %s: %s",
                path,
                job,
                "done" if result == 0 else f"failed ({result})",
            )
        if trainer.world_size > 1:
            torch.distributed.broadcast(requeued, src=0)
        if requeued.item() == 0:  # keep training; the checkpoint is there for a manual restart
            self.requested = False
            return
        while True:  # Slurm stops the job and starts it again; nothing more to do here
            time.sleep(5)


class Throughput(Callback):
    """Logs cells/s, and a plain progress line (step, loss, cells/s, ETA) on stderr every
    `every` steps when no progress bar is shown. The ETA extrapolates the time per step since
    the first batch (evaluation and checkpoints included)."""

    def __init__(self, every: int, show_lines: bool) -> None:
        self.every, self.show_lines = every, show_lines
        self._start: float | None = None
        self._start_step = 0
        self._cells = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._start is None:
            # The first batch pays compilation and warm-up.
            self._start, self._start_step, self._cells = now, trainer.global_step, 0
            return
        self._cells += n_cells(batch) * trainer.world_size
        if trainer.global_step % self.every == 0 and now > self._start:
            rate = self._cells / (now - self._start)
            module.log("train/cells_per_s", rate, rank_zero_only=True)
            if self.show_lines and trainer.is_global_zero:
                loss = trainer.callback_metrics.get("train/loss")
                done = trainer.global_step - self._start_step
                left = (
                    (trainer.max_steps - trainer.global_step) * (now - self._start) / max(done, 1)
                )
                print(
                    f"step {trainer.global_step}/{trainer.max_steps}  loss {float(loss):.4f}  "
                    f"{rate:,.0f} cells/s  ETA {duration(left)}",
                    file=sys.stderr,
                    flush=True,
                )


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def training_callbacks(
    settings: dict[str, Any], run_dir: Path, optimizer: OptimizerConfig, *, interactive: bool
) -> list[Callback]:
    """The Trainer's callbacks: checkpoints, learning rate, throughput (add yours here)."""
    return [
        PeriodicCheckpoints(
            dirpath=run_dir / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=settings["checkpoint_every_n_steps"],
            save_top_k=settings["keep_checkpoints"],
            monitor="step",
            mode="max",
            save_last=False,
        ),
        DecayStartCheckpoint(run_dir, optimizer),
        LearningRateMonitor(logging_interval="step"),
        Throughput(settings["log_every_n_steps"], not interactive),
    ]


class _ContinuedMetrics(ExperimentWriter):
    """Lightning's CSV writer, continuing `metrics.csv` instead of deleting it on a resumed run
    (`identity.prepare_run_dir` has trimmed it to the resumed step)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = file.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class MetricsCSV(CSVLogger):
    """`logs/metrics.csv`, continued across resumptions."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetrics(log_dir=self.log_dir)
        return self._experiment


def loggers_for(settings: dict[str, Any], run_dir: Path) -> list[Any]:
    """CSV always; TensorBoard and Weights & Biases when enabled (runtime settings)."""
    loggers: list[Any] = [MetricsCSV(run_dir, name="logs", version="")]
    if settings["tensorboard"]:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    if settings["wandb"]["enabled"]:
        from lightning.pytorch.loggers import WandbLogger

        wandb = settings["wandb"]
        loggers.append(
            WandbLogger(
                project=wandb["project"],
                entity=wandb["entity"],
                save_dir=str(run_dir),
                offline=wandb["mode"] == "offline",
                name=run_dir.name,
            )
        )
    return loggers


def strategy_for(setting: str, world: int) -> Any:
    """DDP across devices and nodes, or FSDP sharding transformer layers for large models."""
    if setting == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from cellfoundry.models.encoder import TransformerLayer

        return FSDPStrategy(
            auto_wrap_policy={TransformerLayer}, activation_checkpointing_policy=None
        )
    if setting == "ddp" or world > 1:
        return "ddp"
    return "auto"


def make_trainer(
    settings: dict[str, Any],
    run_dir: Path,
    callbacks: list[Callback],
    *,
    devices: int,
    num_nodes: int,
    accelerator: str,
    under_slurm: bool,
    interactive: bool,
) -> L.Trainer:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy_for(settings["strategy"], devices * num_nodes),
        precision=precision_for(settings["precision"]),
        max_steps=settings["max_steps"],
        gradient_clip_val=settings["gradient_clip_val"] or None,
        accumulate_grad_batches=settings["accumulate_grad_batches"],
        val_check_interval=settings["val_every_n_steps"] * settings["accumulate_grad_batches"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=settings["log_every_n_steps"],
        callbacks=callbacks,
        plugins=[SLURMEnvironment(auto_requeue=False)] if under_slurm else None,
        logger=loggers_for(settings, run_dir),
        default_root_dir=run_dir,
        enable_progress_bar=interactive,
        use_distributed_sampler=False,  # our batch plans give each rank its slice
        deterministic=False,
    )


# ----------------------------------------------------------------------------- stages


def start_run(run_dir: Path, identity: RunIdentity, optimizer: OptimizerConfig) -> Path | None:
    """The checkpoint to resume (None: step 0): rank 0 prepares the run folder, others wait."""
    if is_global_zero():
        return prepare_run_dir(run_dir, identity, optimizer)
    return wait_for_run_dir(run_dir, identity)


def fit(
    trainer: L.Trainer,
    system: PretrainingSystem,
    data: ShardDataModule,
    resume: Path | None,
    run_dir: Path,
    *,
    checkpoint_every: int,
) -> None:
    """Train to max_steps (a validation at step 0 first, when starting afresh) and make sure
    a checkpoint of the last step exists."""
    if resume is None:
        # A validation at step 0 gives the baseline that training must beat.
        trainer.validate(system, datamodule=data, verbose=False)
    else:
        log.info("resuming from %s", resume)
    trainer.fit(system, datamodule=data, ckpt_path=str(resume) if resume else None)
    # The periodic checkpoints hold every multiple of checkpoint_every; decided alike on every
    # rank (not by looking at files), since saving is a collective.
    if trainer.global_step % checkpoint_every:
        trainer.save_checkpoint(run_dir / "checkpoints" / f"step{trainer.global_step:07d}.ckpt")


def export_run(
    trainer: L.Trainer,
    system: PretrainingSystem,
    layout: VocabularyLayout,
    settings: dict[str, Any],
    inputs: TrainInputs,
    run_dir: Path,
    *,
    identity: RunIdentity,
    seed: int,
) -> Path:
    """Export to `exports/<identity>-step<N>/` (unless a rerun finds it there: same identity and
    steps, same model) and publish it as `final/` (global rank 0)."""
    final = run_dir / "final"
    if not trainer.is_global_zero:
        return final
    mappings, _ = read_vocabularies(settings, inputs)
    extra = {f"gene_summaries/{s}.parquet": p for s, p in inputs.summaries.items()}
    extra |= {f"references/{s}.parquet": p for s, p in inputs.references.items()}
    extra |= {
        f"panels/{s}/{n}.csv": p for s, panels in inputs.panels.items() for n, p in panels.items()
    }
    folder = run_dir / "exports" / f"{identity.digest}-step{trainer.global_step}"
    if (folder / "config.json").is_file():
        log.info("%s holds this identity after these steps already: kept", folder)
    else:
        export_model(
            system.model,
            layout,
            mappings,
            folder,
            extra_files=extra,
            metadata={
                "objective": settings["objective"],
                "train": settings,
                "seed": seed,
                "steps": trainer.global_step,
                "identity": identity.digest,
            },
        )
    publish(folder, final)
    log.info("exported the model after %d steps to %s (as %s)", trainer.global_step, folder, final)
    return final


def train(
    settings: dict[str, Any],
    inputs: TrainInputs,
    run_dir: str | Path,
    *,
    seed: int,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Train (or continue) the run in `run_dir` and export it to `<run_dir>/final`."""
    run_dir = Path(run_dir)
    precision = precision_for(settings["precision"])
    identity = run_identity(
        settings, inputs, seed=seed, world_size=devices * num_nodes, precision=precision
    )
    optimizer = optimizer_config(settings)
    resume = start_run(run_dir, identity, optimizer)
    # Under Slurm, our SIGUSR1 handler is in place before anything slow (see SlurmRequeue).
    from lightning.fabric.plugins.environments import SLURMEnvironment

    under_slurm = SLURMEnvironment.detect()
    requeue = [SlurmRequeue(run_dir)] if under_slurm else []
    L.seed_everything(derive_seed(seed, "model") % 2**32, workers=True, verbose=False)
    system, data, layout = build(settings, inputs, seed=seed)
    if settings["compile"]:
        system.model.encoder.compile()  # in place: state-dict keys stay as they are
    interactive = sys.stderr.isatty()
    trainer = make_trainer(
        settings,
        run_dir,
        [
            *training_callbacks(settings, run_dir, optimizer, interactive=interactive),
            *requeue,
            *evaluation_callbacks(evaluation, inputs.manifest, seed=seed),
        ],
        devices=devices,
        num_nodes=num_nodes,
        accelerator=accelerator,
        under_slurm=under_slurm,
        interactive=interactive,
    )
    log.info(
        "run %s: rank %d of world size %d (%d node(s) x %d device(s)), node rank %d on %s, %s, "
        "precision %s, %s parameters",
        identity.digest,
        trainer.global_rank,
        trainer.world_size,
        num_nodes,
        devices,
        trainer.node_rank,
        socket.gethostname(),
        type(trainer.accelerator).__name__,
        trainer.precision,
        f"{sum(p.numel() for p in system.parameters()):,}",
    )
    fit(
        trainer,
        system,
        data,
        resume,
        run_dir,
        checkpoint_every=settings["checkpoint_every_n_steps"],
    )
    export_dir = export_run(
        trainer, system, layout, settings, inputs, run_dir, identity=identity, seed=seed
    )
    log.info(
        "rank %d of world size %d finished at step %d",
        trainer.global_rank,
        trainer.world_size,
        trainer.global_step,
    )
    return export_dir
