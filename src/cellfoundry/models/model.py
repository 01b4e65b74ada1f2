"""The pretrained model: a `TranscriptomeEncoder` plus the heads of its objective.

A plain `nn.Module` (no Lightning): the training system (`cellfoundry.train.system`) wraps it,
the export writes its state dict, and `load_pretrained` gives it back for inference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cellfoundry.config import schema_default
from cellfoundry.models.encoder import EncoderConfig, TranscriptomeEncoder
from cellfoundry.models.heads import BertMLMHead, ProjectionHead, TimeEmbedding, ValueHead

Objective = Literal["binned_mlm", "geneformer_mlm", "contrastive", "diffusion"]
OBJECTIVES: tuple[str, ...] = ("binned_mlm", "geneformer_mlm", "contrastive", "diffusion")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a `CellModel`: the encoder and the objective's heads.

    Attributes
    ----------
    objective
        Which heads the model carries (see `OBJECTIVES`).
    encoder
        The encoder's configuration.
    n_bins
        Value bins of the shards (bin 0 = zero); value id `n_bins` is the MASK state.
    projection_dim
        Width of contrastive cell embeddings.
    temperature
        Initial temperature of the contrastive loss (learnable; CLIP starts at 0.07).
    pooling
        How a cell embedding is read from the hidden states: `cls` or `mean`; None (the
        config's default) means `cls` for a model with a cell head (scGPT trains its `<cls>`
        embedding with GEPC), else `mean`.
    cell_head
        scGPT's gene expression prediction from the cell embedding (GEPC/MVC): a head that
        predicts a gene's value bin from (its token embedding x the cell embedding), which
        makes the cell embedding carry the cell's expression state.
    """

    objective: Objective
    encoder: EncoderConfig
    n_bins: int = schema_default("shards.n_bins")
    projection_dim: int = 128
    temperature: float = schema_default("train.temperature")
    pooling: Literal["cls", "mean"] | None = schema_default("train.pooling")
    cell_head: bool = False

    def __post_init__(self) -> None:
        if self.pooling is None:
            object.__setattr__(self, "pooling", "cls" if self.cell_head else "mean")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "encoder": asdict(self.encoder)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**{**values, "encoder": EncoderConfig(**values["encoder"])})


class CellModel(nn.Module):
    """Encoder + heads; `encode` and `cell_embedding` work in both batch layouts.

    Parameters
    ----------
    config
        The architecture.
    gene_embeddings
        Optional frozen pretrained gene embeddings [vocab_size, gene_embedding_dim].
    """

    def __init__(self, config: ModelConfig, gene_embeddings: Tensor | None = None) -> None:
        super().__init__()
        if config.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {config.objective!r}; expected one of {OBJECTIVES}"
            )
        self.config = config
        self.encoder = TranscriptomeEncoder(config.encoder, gene_embeddings)
        d_model = config.encoder.d_model
        self.value_head: ValueHead | None = None
        self.mlm_head: BertMLMHead | None = None
        self.projection: ProjectionHead | None = None
        self.time_embedding: TimeEmbedding | None = None
        self.cell_head: ValueHead | None = None
        if config.cell_head:
            self.cell_head = ValueHead(d_model, config.n_bins, activation=config.encoder.activation)
        if config.objective in ("binned_mlm", "diffusion"):
            self.value_head = ValueHead(
                d_model, config.n_bins, activation=config.encoder.activation
            )
        if config.objective == "geneformer_mlm":
            self.mlm_head = BertMLMHead(config.encoder, self.encoder.token_embedding)
        if config.objective == "contrastive":
            self.projection = ProjectionHead(d_model, config.projection_dim, pooling=config.pooling)
            # CLIP's learnable temperature (CLIP initialises it at T = 0.07).
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))
        if config.objective == "diffusion":
            self.time_embedding = TimeEmbedding(d_model)

    def encode(self, batch: dict[str, Tensor], *, condition: Tensor | None = None) -> Tensor:
        """Hidden states of a batch: [B, L, D] (padded) or [T, D] (with `cu_seqlens`)."""
        values = batch.get("values")
        if "cu_seqlens" in batch:
            return self.encoder.forward_varlen(
                batch["tokens"],
                values,
                batch["cu_seqlens"],
                int(batch["max_seqlen"]),
                condition=condition,
            )
        return self.encoder(batch["tokens"], values, batch["padding_mask"], condition=condition)

    def pool(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """One vector per cell: the `<cls>` position or the mean over real positions."""
        if "cu_seqlens" in batch:
            starts = batch["cu_seqlens"][:-1].long()
            if self.config.pooling == "cls":
                return hidden[starts]
            cell = torch.repeat_interleave(
                torch.arange(len(starts), device=hidden.device),
                torch.diff(batch["cu_seqlens"]).long(),
            )
            sums = torch.zeros(
                len(starts), hidden.shape[-1], device=hidden.device, dtype=hidden.dtype
            )
            sums.index_add_(0, cell, hidden)
            return sums / torch.diff(batch["cu_seqlens"]).to(hidden.dtype)[:, None]
        if self.config.pooling == "cls":
            return hidden[:, 0]
        keep = (~batch["padding_mask"]).to(hidden.dtype)[..., None]
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)

    def predict_from_cell(self, cell: Tensor, tokens: Tensor) -> Tensor:
        """Value-bin logits of genes `tokens` [N] given their cells' embeddings `cell` [N, D]
        (GEPC: the query is the gene's token embedding, gated by the cell embedding)."""
        return self.cell_head(self.encoder.token_embedding(tokens) * cell)

    def cell_embedding(self, batch: dict[str, Tensor]) -> Tensor:
        """Cell embeddings [B, D'] for downstream use (the projection for contrastive models).

        A diffusion model sees its clean input at noise level 0.
        """
        condition = None
        if self.time_embedding is not None:
            n = (
                batch["cu_seqlens"].shape[0] - 1
                if "cu_seqlens" in batch
                else batch["tokens"].shape[0]
            )
            condition = self.time_embedding(torch.zeros(n, device=batch["tokens"].device))
        hidden = self.encode(batch, condition=condition)
        if self.projection is not None:
            if "cu_seqlens" in batch:
                return self.projection.forward_varlen(hidden, batch["cu_seqlens"])
            return self.projection(hidden, batch["padding_mask"])
        return self.pool(hidden, batch)
