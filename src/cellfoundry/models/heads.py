"""Output heads on top of `TranscriptomeEncoder` hidden states, and the diffusion time embedding.

Heads accept hidden states in either layout ([B, L, D] padded or [T, D] varlen) and can evaluate
only selected positions: pass ``positions`` as a boolean mask over the leading dimensions or as
flat indices into them. Flat indices built by the data loader avoid the device sync that boolean
indexing implies (and keep ``torch.compile`` graphs whole).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from cellfoundry.models.encoder import EncoderConfig, activation_fn, init_bert_weights

__all__ = ["BertMLMHead", "ProjectionHead", "TimeEmbedding", "ValueHead", "select_positions"]


def select_positions(hidden: Tensor, positions: Tensor | None) -> Tensor:
    """Hidden states [N, D] at `positions` (all of them, flattened, when None).

    Parameters
    ----------
    hidden
        [..., D] in either layout.
    positions
        Boolean mask with the leading shape of `hidden`, or LongTensor of flat indices into
        ``hidden.reshape(-1, D)``.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    if positions is None:
        return flat
    if positions.dtype == torch.bool:
        return hidden[positions]
    return flat.index_select(0, positions.reshape(-1))


class BertMLMHead(nn.Module):
    """BERT's masked-language-model head (``cls.predictions``).

    dense -> activation -> LayerNorm -> decoder to the vocabulary. The decoder weight is the
    input token embedding (tied); its bias is the head's own.

    Parameters
    ----------
    config
        The encoder's configuration (width, vocabulary, activation, LayerNorm epsilon).
    token_embedding
        The encoder's input embedding to tie the decoder to (``encoder.token_embedding``); None
        gives an untied decoder, which `tie_weights` can tie later.
    """

    def __init__(self, config: EncoderConfig, token_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = activation_fn(config.activation)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))
        if token_embedding is not None:
            self.tie_weights(token_embedding)

    def tie_weights(self, token_embedding: nn.Embedding) -> None:
        """Share the decoder weight with `token_embedding` (one Parameter, two owners)."""
        if token_embedding.weight.shape != self.decoder.weight.shape:
            raise ValueError(
                f"cannot tie a decoder {tuple(self.decoder.weight.shape)} to an embedding "
                f"{tuple(token_embedding.weight.shape)}"
            )
        self.decoder.weight = token_embedding.weight

    def forward(self, hidden: Tensor, positions: Tensor | None = None) -> Tensor:
        """Vocabulary logits.

        Parameters
        ----------
        hidden
            Encoder output [B, L, D] or [T, D].
        positions
            Where to compute logits (see `select_positions`); None: everywhere, keeping the
            leading shape.

        Returns
        -------
        [N, V] at the selected positions, or [..., V] when `positions` is None.
        """
        h = hidden if positions is None else select_positions(hidden, positions)
        return self.decoder(self.norm(self.act(self.dense(h))))


class ValueHead(nn.Module):
    """Predicts value bins per position (scGPT-style masked value modeling, SEDD scores).

    Parameters
    ----------
    d_model
        Encoder width.
    n_bins
        Output classes: the real value ids ``0 .. n_bins - 1`` (the MASK value state is never a
        target; for SEDD the outputs are the unnormalised log-scores of the real states, see
        `cellfoundry.models.losses.sedd_log_score`).
    transform
        Put BERT's dense -> activation -> LayerNorm before the output layer.
    activation
        Activation of the transform.
    layer_norm_eps
        LayerNorm epsilon of the transform.
    init_std
        Standard deviation of the weight initialisation.
    """

    def __init__(
        self,
        d_model: int,
        n_bins: int,
        *,
        transform: bool = True,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-12,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.transform = (
            nn.Sequential(
                nn.Linear(d_model, d_model),
                activation_fn(activation),
                nn.LayerNorm(d_model, eps=layer_norm_eps),
            )
            if transform
            else nn.Identity()
        )
        self.out = nn.Linear(d_model, n_bins)
        self.apply(lambda m: init_bert_weights(m, init_std))

    def forward(self, hidden: Tensor, positions: Tensor | None = None) -> Tensor:
        """Bin logits [N, n_bins] at `positions`, or [..., n_bins] when None."""
        h = hidden if positions is None else select_positions(hidden, positions)
        return self.out(self.transform(h))


class ProjectionHead(nn.Module):
    """Pools a cell embedding and projects it for contrastive learning (CLIP-style, linear).

    Parameters
    ----------
    d_model
        Encoder width.
    out_dim
        Width of the contrastive embedding.
    pooling
        ``"cls"``: the first token of each cell (the ``<cls>`` position); ``"mean"``: the mean
        over the cell's non-padded positions (``<cls>`` included when present).
    init_std
        Standard deviation of the weight initialisation.
    """

    def __init__(
        self,
        d_model: int,
        out_dim: int,
        *,
        pooling: Literal["cls", "mean"] = "cls",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")
        self.pooling = pooling
        # No bias: the loss compares directions (cosine similarity), as in CLIP.
        self.proj = nn.Linear(d_model, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def pool(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Cell embeddings [B, D] from padded hidden states [B, L, D]."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if padding_mask is None:
            return hidden.mean(dim=1)
        keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)

    def pool_varlen(self, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Cell embeddings [B, D] from varlen hidden states [T, D]."""
        starts = cu_seqlens[:-1].to(torch.long)
        if self.pooling == "cls":
            return hidden.index_select(0, starts)
        n_cells = cu_seqlens.shape[0] - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        cell = torch.repeat_interleave(
            torch.arange(n_cells, device=hidden.device), lengths, output_size=hidden.shape[0]
        )
        sums = hidden.new_zeros(n_cells, hidden.shape[-1]).index_add_(0, cell, hidden)
        return sums / lengths.clamp_min(1).unsqueeze(-1).to(hidden.dtype)

    def forward(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Projected cell embeddings [B, out_dim] from padded hidden states."""
        return self.proj(self.pool(hidden, padding_mask))

    def forward_varlen(self, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Projected cell embeddings [B, out_dim] from varlen hidden states."""
        return self.proj(self.pool_varlen(hidden, cu_seqlens))


class TimeEmbedding(nn.Module):
    """Embeds a per-cell noise level sigma for diffusion models (SEDD's ``TimestepEmbedder``).

    Sinusoidal features of sigma (frequencies ``max_period^(-i / half)``) -> Linear -> SiLU ->
    Linear. Pass the output as ``condition`` to `TranscriptomeEncoder`, which adds it to every
    token embedding of the cell before the embedding LayerNorm (additive conditioning rather
    than SEDD's adaLN: it keeps one encoder for all families). For the absorbing graph the noise
    level is largely recoverable from the number of MASK states in the input, and
    `sedd_log_score` already rescales by sigma, so this conditioning is a help, not a necessity.

    Parameters
    ----------
    d_model
        Encoder width.
    frequency_dim
        Number of sinusoidal features.
    max_period
        Longest period of the sinusoids.
    init_std
        Standard deviation of the weight initialisation.
    """

    def __init__(
        self,
        d_model: int,
        *,
        frequency_dim: int = 256,
        max_period: float = 10_000.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )
        self.apply(lambda m: init_bert_weights(m, init_std))

    def sinusoidal(self, sigma: Tensor) -> Tensor:
        """Sinusoidal features [B, frequency_dim] of `sigma` [B] (computed in fp32)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period)
            * torch.arange(half, dtype=torch.float32, device=sigma.device)
            / half
        )
        args = sigma.float()[:, None] * freqs[None, :]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            features = torch.cat([features, features.new_zeros(features.shape[0], 1)], dim=-1)
        return features

    def forward(self, sigma: Tensor) -> Tensor:
        """Condition vectors [B, D] for noise levels `sigma` [B]."""
        features = self.sinusoidal(sigma).to(self.mlp[0].weight.dtype)
        return self.mlp(features)
