"""The transcriptome encoder shared by all model families: embeddings + a transformer stack.

One module covers the families by configuration:

- Geneformer: ``position="learned"``, ``norm_first=False`` (post-LN), ``n_values=0``,
  ``type_vocab_size=1``: exactly a Hugging Face BERT encoder (see `cellfoundry.models.hf`);
- scGPT-style / SEDD: ``n_values=n_bins + 1`` (value ids plus the MASK value state), usually
  ``position="none"`` (a cell is a set of genes) and ``norm_first=True``;
- scConcept: rank-ordered genes with ``position="learned"`` and optional pretrained gene
  embeddings through a linear adapter.

Padded inputs must be right-padded (real tokens first): learned positions count from the first
token, as in BERT, so the padded and varlen paths see the same positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cellfoundry.config import schema_default
from cellfoundry.models.attention import SelfAttention, varlen_index

__all__ = [
    "ACTIVATIONS",
    "EncoderConfig",
    "TranscriptomeEncoder",
    "TransformerLayer",
    "activation_fn",
    "init_bert_weights",
]

# Our name -> Hugging Face `hidden_act` name; the HF export relies on this table.
ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def activation_fn(name: str) -> nn.Module:
    """The activation module called `name` (a key of `ACTIVATIONS`)."""
    if name == "gelu":
        return nn.GELU()  # exact (erf) GELU, BERT's "gelu"
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()  # Geneformer V1
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and behaviour of a `TranscriptomeEncoder`.

    Defaults of the keys the config sets (`train.model.*`) are the config schema's; the
    presets (`cellfoundry.train.presets`) describe each family's encoder.

    Parameters
    ----------
    vocab_size
        Number of gene token ids of the token mapping (``<cls>`` 0, ``<pad>`` 1, ``<mask>`` 2,
        genes from 3).
    d_model
        Model width.
    n_layers
        Number of transformer layers.
    n_heads
        Attention heads per layer.
    d_ff
        Width of the feed-forward hidden layer.
    dropout
        Dropout on embeddings and on each residual branch.
    attention_dropout
        Dropout on attention probabilities. Keep it 0 for padding-free training on GPUs without
        flash-attn: PyTorch's varlen kernel has no dropout, so a non-zero value falls back to
        padded attention.
    max_len
        Number of learned positions (the longest cell, ``<cls>`` included).
    n_values
        Number of value ids including the MASK value state (n_bins + 1); 0: no value embedding.
    position
        ``"learned"`` absolute positions (BERT, rank-ordered cells) or ``"none"``.
    norm_first
        Pre-LN layers with a final LayerNorm (modern) instead of post-LN (BERT).
    activation
        Feed-forward and MLM-head activation, a key of `ACTIVATIONS`.
    layer_norm_eps
        LayerNorm epsilon (BERT: 1e-12).
    pad_token_id
        Token id of ``<pad>``; its embedding row starts at zero and gets no gradient from the
        input side, as in BERT.
    initializer_range
        Standard deviation of the normal weight initialisation.
    type_vocab_size
        Rows of BERT's token-type embedding, of which row 0 is added at every position; 1 for
        BERT compatibility, 0 to leave it out.
    gene_embedding_dim
        Width of frozen pretrained gene embeddings fed through a linear adapter (e.g. 640 for
        ESM2-t30); None: none.
    gradient_checkpointing
        Recompute each layer's activations in the backward pass to save memory.
    final_norm_bias
        Whether the final LayerNorm (pre-LN) has a bias. An objective that centres cell
        embeddings over the batch cancels that bias exactly, so it would only learn float noise.
    """

    vocab_size: int
    d_model: int = schema_default("train.model.d_model")
    n_layers: int = schema_default("train.model.n_layers")
    n_heads: int = schema_default("train.model.n_heads")
    d_ff: int = schema_default("train.model.d_ff")
    dropout: float = schema_default("train.model.dropout")
    attention_dropout: float = schema_default("train.model.attention_dropout")
    max_len: int = schema_default("train.model.max_len")
    n_values: int = 0
    position: Literal["learned", "none"] = "learned"
    norm_first: bool = schema_default("train.model.norm_first")
    activation: str = schema_default("train.model.activation")
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    initializer_range: float = 0.02
    type_vocab_size: int = 1
    gene_embedding_dim: int | None = None
    gradient_checkpointing: bool = schema_default("train.model.gradient_checkpointing")
    final_norm_bias: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.position not in ("learned", "none"):
            raise ValueError(f"position must be 'learned' or 'none', not {self.position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.n_values < 0 or self.type_vocab_size < 0:
            raise ValueError("n_values and type_vocab_size must be >= 0")

    @property
    def is_bert_compatible(self) -> bool:
        """Whether encoder + `BertMLMHead` are exactly a Hugging Face ``BertForMaskedLM``."""
        return (
            not self.norm_first
            and self.position == "learned"
            and self.type_vocab_size >= 1
            and self.n_values == 0
            and self.gene_embedding_dim is None
        )


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation, applied to one module (use with ``Module.apply``).

    Linear and embedding weights ~ N(0, std), biases zero, LayerNorm weight one and bias zero,
    the padding row of an embedding zero.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Embeddings(nn.Module):
    """Token (+ gene adapter) + value + position + token-type embeddings, LayerNorm, dropout.

    With pretrained gene embeddings, a gene's representation is
    ``token_embedding(token) + gene_adapter(gene_embeddings[token])``: the frozen vectors (e.g.
    ESM2 protein embeddings, as scConcept uses) carry prior knowledge through a learned linear
    map, while the learned token embedding can still correct each gene. Rows of special tokens
    and of genes without a pretrained vector are zero, so only the learned part is left there.
    """

    def __init__(self, config: EncoderConfig, gene_embeddings: Tensor | None = None) -> None:
        super().__init__()
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.value_embedding = nn.Embedding(config.n_values, d) if config.n_values > 0 else None
        self.position_embedding = (
            nn.Embedding(config.max_len, d) if config.position == "learned" else None
        )
        self.token_type_embedding = (
            nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size > 0 else None
        )
        if config.gene_embedding_dim is None:
            if gene_embeddings is not None:
                raise ValueError("gene_embeddings given but config.gene_embedding_dim is None")
            self.gene_adapter = None
            self.gene_embeddings: Tensor | None = None
        else:
            shape = (config.vocab_size, config.gene_embedding_dim)
            if gene_embeddings is None:
                # Filled by load_state_dict when a checkpoint is restored.
                gene_embeddings = torch.zeros(shape)
            elif tuple(gene_embeddings.shape) != shape:
                raise ValueError(
                    f"gene_embeddings has shape {tuple(gene_embeddings.shape)}, expected "
                    f"[vocab_size, gene_embedding_dim] = {list(shape)}"
                )
            # A buffer, not a parameter: saved with the model, moved with it, never trained.
            self.register_buffer("gene_embeddings", gene_embeddings.detach().float().clone())
            self.gene_adapter = nn.Linear(config.gene_embedding_dim, d, bias=False)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.max_len = config.max_len

    def forward(
        self,
        tokens: Tensor,
        values: Tensor | None,
        positions: Tensor | None,
        condition: Tensor | None,
    ) -> Tensor:
        """Embed tokens of any leading shape S; `positions` and `condition` broadcast to S (+ D)."""
        h = self.token_embedding(tokens)
        if self.gene_adapter is not None:
            h = h + self.gene_adapter(self.gene_embeddings[tokens].to(h.dtype))
        if self.value_embedding is not None:
            if values is None:
                raise ValueError("this encoder embeds values (n_values > 0) but values is None")
            h = h + self.value_embedding(values)
        elif values is not None:
            raise ValueError("values given but the encoder has no value embedding (n_values=0)")
        if self.position_embedding is not None:
            h = h + self.position_embedding(positions)
        if self.token_type_embedding is not None:
            h = h + self.token_type_embedding.weight[0]  # token_type_ids are all zero
        if condition is not None:
            h = h + condition
        return self.dropout(self.norm(h))


class FeedForward(nn.Module):
    """Position-wise two-layer MLP (BERT's intermediate + output dense)."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = activation_fn(activation)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """One encoder layer, post-LN (BERT) or pre-LN.

    Post-LN: ``x = LN(x + drop(attn(x)))``, ``x = LN(x + drop(ffn(x)))``.
    Pre-LN: ``x = x + drop(attn(LN(x)))``, ``x = x + drop(ffn(LN(x)))``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.attention = SelfAttention(
            config.d_model, config.n_heads, dropout=config.attention_dropout
        )
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def _block(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            x = x + self.dropout(attend(self.attention_norm(x)))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(attend(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Padded layout: `x` [B, L, D], `padding_mask` [B, L] True where padded."""
        return self._block(x, lambda h: self.attention(h, padding_mask))

    def forward_varlen(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Varlen layout: `x` [T, D]."""
        return self._block(x, lambda h: self.attention.forward_varlen(h, cu_seqlens, max_seqlen))


class TranscriptomeEncoder(nn.Module):
    """Embeddings + transformer layers; returns one hidden state per input token.

    Parameters
    ----------
    config
        The architecture.
    gene_embeddings
        Optional frozen gene embeddings [vocab_size, config.gene_embedding_dim], rows indexed by
        token id (zero for special tokens and genes without one); see `Embeddings`.

    Notes
    -----
    ``condition`` [B, D] (e.g. a `TimeEmbedding` of the diffusion noise level) is added to every
    token embedding of its cell before the embedding LayerNorm, the way BERT adds position and
    token-type embeddings.
    """

    def __init__(self, config: EncoderConfig, gene_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, gene_embeddings)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.n_layers))
        self.final_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.final_norm_bias)
            if config.norm_first
            else None
        )
        self.gradient_checkpointing = config.gradient_checkpointing
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @property
    def token_embedding(self) -> nn.Embedding:
        """The input token embedding (the MLM decoder ties its weight to it)."""
        return self.embeddings.token_embedding

    def _run_layer(self, fn: Callable[..., Tensor], *args: object) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self,
        tokens: Tensor,
        values: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        condition: Tensor | None = None,
    ) -> Tensor:
        """Encode a padded batch.

        Parameters
        ----------
        tokens
            Gene token ids [B, L], right-padded with ``<pad>``.
        values
            Value ids [B, L] (required iff ``n_values > 0``).
        padding_mask
            [B, L], True where padded. Padded positions never influence real ones.
        condition
            Optional per-cell vector [B, D] added to every position's embedding.

        Returns
        -------
        Hidden states [B, L, D] (meaningless at padded positions).
        """
        length = tokens.shape[1]
        positions = None
        if self.embeddings.position_embedding is not None:
            if length > self.config.max_len:
                raise ValueError(f"cells of {length} tokens exceed max_len={self.config.max_len}")
            positions = torch.arange(length, device=tokens.device)
        if condition is not None:
            condition = condition[:, None, :]
        h = self.embeddings(tokens, values, positions, condition)
        for layer in self.layers:
            h = self._run_layer(layer, h, padding_mask)
        return self.final_norm(h) if self.final_norm is not None else h

    def forward_varlen(
        self,
        tokens: Tensor,
        values: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        condition: Tensor | None = None,
    ) -> Tensor:
        """Encode a padding-free batch (cells concatenated).

        Parameters
        ----------
        tokens
            Gene token ids [T].
        values
            Value ids [T] (required iff ``n_values > 0``).
        cu_seqlens
            Cumulative cell lengths [B + 1], int32, starting at 0.
        max_seqlen
            Length of the longest cell.
        condition
            Optional per-cell vector [B, D] added to every token of its cell.

        Returns
        -------
        Hidden states [T, D].
        """
        if self.embeddings.position_embedding is not None and max_seqlen > self.config.max_len:
            raise ValueError(f"cells of {max_seqlen} tokens exceed max_len={self.config.max_len}")
        cell, positions = varlen_index(cu_seqlens, tokens.shape[0])
        if condition is not None:
            condition = condition[cell]
        h = self.embeddings(tokens, values, positions, condition)
        for layer in self.layers:
            h = self._run_layer(layer.forward_varlen, h, cu_seqlens, max_seqlen)
        return self.final_norm(h) if self.final_norm is not None else h

    def num_parameters(self, *, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the encoder (forward + backward, no output head).

        ``6 L (4 H^2 + 2 H F) + 12 L S H`` as in ``notes/performance.md``; add the head's
        ``6 H V`` (times the masked fraction when logits are computed on masked positions only).
        """
        c = self.config
        dense = 6 * c.n_layers * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff)
        return float(dense + 12 * c.n_layers * seq_len * c.d_model)
