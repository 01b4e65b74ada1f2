"""Run a training: build the data module, the system and the Lightning Trainer; resume; export.

Devices and nodes are arguments (the Snakemake rule takes them from its resources, i.e. from
the profile), never part of the science settings. Under Slurm, Lightning's SLURMEnvironment
picks up ranks from `srun` and requeues on SIGUSR1 after saving `hpc_ckpt_*.ckpt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
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
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from cellfoundry.io import read_json, sha256, write_json
from cellfoundry.models.encoder import EncoderConfig
from cellfoundry.models.model import ModelConfig
from cellfoundry.seeds import derive_seed
from cellfoundry.train.data import ShardDataModule, VocabularyLayout, n_cells, read_medians
from cellfoundry.train.evaluation import evaluation_callbacks
from cellfoundry.train.export import export_model, gene_embedding_matrix
from cellfoundry.train.objectives import make_objective
from cellfoundry.train.system import OptimizerConfig, PretrainingSystem
from cellfoundry.vocabulary import read_token_mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    """Files a training reads (all produced by the pipeline)."""

    manifest: Path
    token_mappings: dict[str, Path]
    summaries: dict[str, Path]
    gene_embeddings: dict[str, Path]
    panels: dict[str, dict[str, Path]] = field(default_factory=dict)


def precision_for(setting: str) -> str:
    """`auto`: bf16 mixed precision on CUDA, full fp32 on CPU."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def fingerprint(settings: dict[str, Any], inputs: TrainInputs, seed: int) -> str:
    """Identity of a training: settings, seed and input contents. Checkpoints of another
    fingerprint are never resumed."""
    digest = hashlib.sha256(
        json.dumps({"settings": settings, "seed": seed}, sort_keys=True).encode()
    )
    panels = [
        p for species in sorted(inputs.panels) for p in sorted(inputs.panels[species].values())
    ]
    for path in [
        inputs.manifest,
        *sorted(inputs.token_mappings.values()),
        *sorted(inputs.gene_embeddings.values()),
        *panels,
    ]:
        digest.update(sha256(path).encode())
    return digest.hexdigest()[:16]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recent checkpoint of a run: periodic ones and Slurm requeue (`hpc_ckpt_*`) ones."""
    candidates = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


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
    """Logs cells/s, and a plain progress line every `every` steps when no progress bar is shown."""

    def __init__(self, every: int, show_lines: bool) -> None:
        self.every, self.show_lines = every, show_lines
        self._start: float | None = None
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
            self._start, self._cells = now, 0  # the first batch pays compilation and warm-up
            return
        self._cells += n_cells(batch) * trainer.world_size
        if trainer.global_step % self.every == 0 and now > self._start:
            rate = self._cells / (now - self._start)
            module.log("train/cells_per_s", rate, rank_zero_only=True)
            if self.show_lines and trainer.is_global_zero:
                loss = trainer.callback_metrics.get("train/loss")
                print(
                    f"step {trainer.global_step}/{trainer.max_steps}  loss {float(loss):.4f}  {rate:,.0f} cells/s",
                    file=sys.stderr,
                    flush=True,
                )


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
    )


def build(
    settings: dict[str, Any], inputs: TrainInputs, *, seed: int
) -> tuple[PretrainingSystem, ShardDataModule, VocabularyLayout]:
    """The system and data module of a training (no Trainer)."""
    mappings = {s: read_token_mapping(s, p) for s, p in inputs.token_mappings.items()}
    layout = VocabularyLayout.from_mappings(mappings)
    first_shard = Path(pl.read_parquet(inputs.manifest)["shard"][0])
    n_bins = int(read_json(first_shard / "shard.json")["n_bins"])
    model = settings["model"]
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
        gene_embedding_dim=None if gene_embeddings is None else gene_embeddings.shape[1],
        gradient_checkpointing=model["gradient_checkpointing"],
        **objective.model_options(),
    )
    name = settings["objective"]
    # The binned model's cell embedding is its <cls> output, trained by the GEPC head.
    cell_head = name == "binned_mlm" and settings["cell_objective"]
    pooling = settings["pooling"] or ("cls" if cell_head else "mean")
    model_config = ModelConfig(
        objective=name, encoder=encoder, n_bins=n_bins, pooling=pooling, cell_head=cell_head
    )
    optimizer = OptimizerConfig(
        **{**settings["optimizer"], "betas": tuple(settings["optimizer"]["betas"])},
        max_steps=settings["max_steps"],
    )
    system = PretrainingSystem(model_config, objective, optimizer, gene_embeddings)
    data = ShardDataModule(
        inputs.manifest,
        mappings,
        objective.collate,
        batch_size=settings["batch_size"],
        seed=derive_seed(seed, "train"),
        within_dataset=objective.within_dataset,
        length_grouped=settings["length_grouped"],
        val_batches=settings["val_batches"],
        num_workers=settings["num_workers"],
        medians=read_medians(list(inputs.summaries.values())) if inputs.summaries else None,
    )
    return system, data, layout


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
    """Train (or resume) and export to `<run_dir>/final`; returns the export folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = fingerprint(settings, inputs, seed)
    marker = run_dir / "fingerprint.json"
    resume = newest_checkpoint(run_dir)
    if resume is not None and (
        not marker.is_file() or read_json(marker).get("fingerprint") != identity
    ):
        if (
            int(os.environ.get("LOCAL_RANK", "0")) == 0
            and int(os.environ.get("SLURM_PROCID", "0")) == 0
        ):
            log.info(
                "settings or inputs changed since the last checkpoints of %s: starting afresh",
                run_dir,
            )
            for stale in (
                run_dir / "checkpoints",
                run_dir / "logs",
                *run_dir.glob("hpc_ckpt_*.ckpt"),
            ):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
                    missing_ok=True
                )
        resume = None
    # Under Slurm, our SIGUSR1 handler is in place before anything slow (see SlurmRequeue).
    from lightning.fabric.plugins.environments import SLURMEnvironment

    under_slurm = SLURMEnvironment.detect()
    requeue = [SlurmRequeue(run_dir)] if under_slurm else []
    L.seed_everything(derive_seed(seed, "model") % 2**32, workers=True, verbose=False)
    system, data, layout = build(settings, inputs, seed=seed)
    if settings["compile"]:
        system.model.encoder.compile()  # in place: state-dict keys stay as they are

    interactive = sys.stderr.isatty()
    loggers: list[Any] = [CSVLogger(run_dir, name="logs", version="")]
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
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=settings["checkpoint_every_n_steps"],
        save_top_k=settings["keep_checkpoints"],
        monitor="step",
        mode="max",
        save_last=False,
    )
    world = devices * num_nodes
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy_for(settings["strategy"], world),
        precision=precision_for(settings["precision"]),
        max_steps=settings["max_steps"],
        gradient_clip_val=settings["gradient_clip_val"] or None,
        accumulate_grad_batches=settings["accumulate_grad_batches"],
        val_check_interval=settings["val_every_n_steps"] * settings["accumulate_grad_batches"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=settings["log_every_n_steps"],
        callbacks=[
            checkpoints,
            LearningRateMonitor(logging_interval="step"),
            Throughput(settings["log_every_n_steps"], not interactive),
            *requeue,
            *evaluation_callbacks(evaluation, inputs.manifest, seed=seed),
        ],
        plugins=[SLURMEnvironment(auto_requeue=False)] if under_slurm else None,
        logger=loggers,
        default_root_dir=run_dir,
        enable_progress_bar=interactive,
        use_distributed_sampler=False,  # our batch plans give each rank its slice
        deterministic=False,
    )
    if trainer.is_global_zero:
        write_json(marker, {"fingerprint": identity})
    log.info(
        "rank %d of world size %d (%d node(s) x %d device(s)), %s, precision %s, %s parameters",
        trainer.global_rank,
        trainer.world_size,
        num_nodes,
        devices,
        type(trainer.accelerator).__name__,
        trainer.precision,
        f"{sum(p.numel() for p in system.parameters()):,}",
    )
    if resume is None:
        # A validation at step 0 gives the baseline that training must beat.
        trainer.validate(system, datamodule=data, verbose=False)
    else:
        log.info("resuming from %s", resume)
    trainer.fit(system, datamodule=data, ckpt_path=str(resume) if resume else None)
    final = run_dir / "checkpoints" / f"step{trainer.global_step:07d}.ckpt"
    if not final.exists():
        trainer.save_checkpoint(final)
    export_dir = run_dir / "final"
    if trainer.is_global_zero:
        extra = {f"gene_summaries/{s}.parquet": p for s, p in inputs.summaries.items()}
        extra |= {
            f"panels/{s}/{n}.csv": p
            for s, panels in inputs.panels.items()
            for n, p in panels.items()
        }
        export_model(
            system.model,
            layout,
            inputs.token_mappings,
            export_dir,
            extra_files=extra,
            metadata={
                "objective": settings["objective"],
                "train": settings,
                "seed": seed,
                "steps": trainer.global_step,
            },
        )
        log.info("exported the model after %d steps to %s", trainer.global_step, export_dir)
    return export_dir
