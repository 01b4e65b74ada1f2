"""The Lightning training system: a `CellModel`, an objective and the optimisation recipe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from cellfoundry.config import schema_default
from cellfoundry.models.model import CellModel, ModelConfig
from cellfoundry.seeds import derive_seed
from cellfoundry.train.data import n_cells


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a learning-rate schedule over `max_steps` (see `lr_factor`).

    Defaults are the config schema's (`train.optimizer.*`, `train.max_steps`).
    """

    lr: float = schema_default("train.optimizer.lr")
    weight_decay: float = schema_default("train.optimizer.weight_decay")
    betas: tuple[float, float] = field(
        default_factory=lambda: tuple(schema_default("train.optimizer.betas"))
    )
    eps: float = schema_default("train.optimizer.eps")
    warmup_steps: int = schema_default("train.optimizer.warmup_steps")
    max_steps: int = schema_default("train.max_steps")
    min_lr_ratio: float = schema_default("train.optimizer.min_lr_ratio")
    schedule: Literal["wsd", "cosine"] = schema_default("train.optimizer.schedule")
    decay_fraction: float = schema_default("train.optimizer.decay_fraction")

    @property
    def decay_start(self) -> int:
        """First step whose learning rate depends on `max_steps`: the start of the wsd decay,
        the end of warmup for cosine."""
        if self.schedule == "cosine":
            return self.warmup_steps
        return max(self.warmup_steps, self.max_steps - round(self.decay_fraction * self.max_steps))


def lr_factor(step: int, config: OptimizerConfig) -> float:
    """Learning-rate multiplier at an optimizer step (0-based).

    Both schedules warm up linearly over `warmup_steps`. `wsd` (warmup-stable-decay) then holds
    the rate and decays it over the last `decay_fraction` of `max_steps` as 1 - sqrt(progress)
    down to `min_lr_ratio` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations", which finds a 20% 1-sqrt cooldown on par with cosine).
    Runs of different lengths share every step before `decay_start`, which is what makes
    raising `max_steps` well-posed: the run continues from a checkpoint taken before the decay
    and equals a run planned that long from the start. `cosine` decays from the end of warmup
    to `min_lr_ratio` at `max_steps`.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    start = config.decay_start
    if config.schedule == "wsd" and step < start:
        return 1.0
    progress = min((step - start) / max(config.max_steps - start, 1), 1.0)
    if config.schedule == "wsd":
        return floor + (1 - floor) * (1 - math.sqrt(progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def shared_steps(a: OptimizerConfig, b: OptimizerConfig) -> int | None:
    """How many leading optimizer steps two recipes train alike (None: all of them).

    A checkpoint taken at step s of one run is a valid start of the other iff s <= this.
    """
    if a == b:
        return None
    if {**asdict(a), "max_steps": 0} != {**asdict(b), "max_steps": 0}:
        return 0
    return min(a.decay_start, b.decay_start)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; biases, norms, embeddings and scalars are exempt."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))  # tied weights appear under two modules
            exempt = (
                isinstance(module, nn.LayerNorm | nn.Embedding)
                or name.endswith("bias")
                or parameter.ndim < 2
            )
            (no_decay if exempt else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class PretrainingSystem(L.LightningModule):
    """Trains a `CellModel` with an objective.

    Parameters
    ----------
    model_config
        The model's architecture.
    objective
        The objective (`cellfoundry.train.objectives`); it computes the loss.
    optimizer
        The optimisation recipe.
    gene_embeddings
        Optional frozen gene embeddings [vocab, dim] for the encoder's adapter.
    seed
        Seed of dropout: each training micro-batch reseeds torch from (seed, step, micro-batch,
        rank), so dropout does not depend on validation, resumption or data-loader workers.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        objective: Any,
        optimizer: OptimizerConfig,
        gene_embeddings: Tensor | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = CellModel(model_config, gene_embeddings)
        self.objective = objective
        self.optimizer_config = optimizer
        self.seed = seed
        self._micro = (-1, 0)  # (optimizer step, micro-batch within it)
        self.save_hyperparameters(
            {
                "model": model_config.to_dict(),
                "optimizer": asdict(optimizer),
                "objective": objective.name,
            },
            logger=True,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step, micro = self._micro
        self._micro = (self.global_step, micro + 1 if step == self.global_step else 0)
        torch.manual_seed(derive_seed(self.seed, "dropout", *self._micro, self.global_rank))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.objective.loss(self.model, batch)
        cells = n_cells(batch)
        self._log_metrics("train", out, cells)
        return self._distributed_loss(out)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_metrics("val", self.objective.loss(self.model, batch), n_cells(batch))

    def _distributed_loss(self, out: dict[str, Tensor]) -> Tensor:
        """The loss whose DDP-averaged gradient is that of one process on the global batch.

        A masked loss is a mean over this rank's masked positions, and DDP averages gradients
        over ranks; weighting each rank by its share of all masked positions (an all-gather of
        one count per step) turns that into the mean over the global batch's positions.
        """
        if "count" not in out or self.trainer.world_size == 1:
            return out["loss"]
        count = out["count"].float()
        total = self.all_gather(count.detach()).sum().clamp_min(1.0)
        return out["loss"] * count * self.trainer.world_size / total

    def _log_metrics(self, stage: str, out: dict[str, Tensor], cells: int) -> None:
        for name, value in out.items():
            if name != "count":
                self.log(
                    f"{stage}/{name}",
                    value,
                    prog_bar=name == "loss",
                    batch_size=cells,
                    sync_dist=stage == "val",
                )

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay),
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
