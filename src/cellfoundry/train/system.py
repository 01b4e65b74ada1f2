"""The Lightning training system: a `CellModel`, an objective and the optimisation recipe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cellfoundry.models.model import CellModel, ModelConfig
from cellfoundry.train.data import n_cells


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio` x `lr` at `max_steps`."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1


def lr_factor(step: int, config: OptimizerConfig) -> float:
    """Learning-rate multiplier at an optimizer step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


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
    """

    def __init__(
        self,
        model_config: ModelConfig,
        objective: Any,
        optimizer: OptimizerConfig,
        gene_embeddings: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = CellModel(model_config, gene_embeddings)
        self.objective = objective
        self.optimizer_config = optimizer
        self.save_hyperparameters(
            {
                "model": model_config.to_dict(),
                "optimizer": asdict(optimizer),
                "objective": objective.name,
            },
            logger=True,
        )

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
