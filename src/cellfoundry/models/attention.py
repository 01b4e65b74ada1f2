"""Bidirectional multi-head self-attention over padded batches and padding-free (varlen) batches.

Two layouts reach the model (see `cellfoundry.models.encoder`):

- padded: ``x`` [B, L, D] with ``padding_mask`` [B, L], True where padded;
- varlen: ``x`` [T, D], the cells of a batch concatenated, with ``cu_seqlens`` [B + 1] (int32,
  cumulative lengths starting at 0) and ``max_seqlen``.

The padded path always runs `torch.nn.functional.scaled_dot_product_attention` (SDPA), which picks
flash / memory-efficient / math kernels by itself. The varlen path prefers, in order:

1. ``flash_attn``: flash-attn's ``flash_attn_varlen_qkvpacked_func`` when the package imports, the
   tensor is on CUDA and in fp16/bf16 (supports attention dropout);
2. ``torch_varlen``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash kernel inside
   PyTorch) on CUDA, fp16/bf16, compute capability >= 8.0 and head_dim a multiple of 8 up to 256.
   Its dropout is fixed at 0, so it is used only when attention dropout is inactive (eval, or
   ``attention_dropout=0``); otherwise the fallback runs;
3. ``sdpa_padded``: the fallback. It pads each cell to ``max_seqlen`` with index arithmetic (no
   Python loop over cells), runs SDPA with the key-padding mask and unpads. It is exact and runs
   everywhere (the only varlen path on CPU), but saves no attention FLOPs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SelfAttention", "attention_backend", "key_padding_attn_mask", "varlen_index"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_varlen_qkvpacked() -> Callable[..., Tensor] | None:
    """flash-attn's packed varlen kernel, or None when flash-attn does not import."""
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except (ImportError, OSError):  # not installed, or built against another torch/CUDA
        return None
    return flash_attn_varlen_qkvpacked_func


@functools.cache
def _torch_varlen_attn() -> Callable[..., Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _effective_dtype(x: Tensor) -> torch.dtype:
    # Under autocast the qkv projection runs in the autocast dtype even when x is fp32.
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def attention_backend(x: Tensor, *, dropout: float = 0.0, head_dim: int | None = None) -> str:
    """Name of the kernel `SelfAttention.forward_varlen` will use for `x` (for logging).

    Parameters
    ----------
    x
        The varlen activations [T, D] (or any tensor with the same device and dtype).
    dropout
        The attention dropout probability in effect (0 in eval mode).
    head_dim
        Per-head width; None skips the head-size check of PyTorch's kernel.

    Returns
    -------
    One of ``"flash_attn"``, ``"torch_varlen"``, ``"sdpa_padded"``.
    """
    if not x.is_cuda or _effective_dtype(x) not in _HALF_DTYPES:
        return "sdpa_padded"
    if _flash_attn_varlen_qkvpacked() is not None:
        return "flash_attn"
    head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)
    if (
        _torch_varlen_attn() is not None
        and dropout == 0.0
        and head_ok
        and _cuda_capability(x.device.index or 0) >= (8, 0)
    ):
        return "torch_varlen"
    return "sdpa_padded"


def key_padding_attn_mask(padding_mask: Tensor) -> Tensor:
    """SDPA boolean mask [B, 1, 1, L] (True = may be attended) from a padding mask [B, L].

    A cell that is entirely padding would have no key to attend to, which gives NaN in some
    kernels; such rows attend to everything instead (finite garbage at positions every loss
    ignores), without data-dependent control flow.
    """
    allowed = ~padding_mask | padding_mask.all(dim=-1, keepdim=True)
    return allowed[:, None, None, :]


def varlen_index(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Cell index and within-cell position of every token of a varlen batch.

    Parameters
    ----------
    cu_seqlens
        Cumulative cell lengths [B + 1], starting at 0.
    total
        Number of tokens T (``cu_seqlens[-1]``, passed to avoid a device sync).

    Returns
    -------
    cell
        LongTensor [T]: which cell each token belongs to.
    position
        LongTensor [T]: 0 .. len - 1 within each cell.
    """
    boundaries = cu_seqlens.to(torch.long)
    token = torch.arange(total, device=cu_seqlens.device)
    cell = torch.searchsorted(boundaries[1:], token, right=True)
    return cell, token - boundaries[cell]


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention with a fused qkv projection.

    The qkv weight stacks the query, key and value projections along the output dimension
    (rows ``[0, D)`` query, ``[D, 2D)`` key, ``[2D, 3D)`` value), which is what the Hugging Face
    BERT export splits again.

    Parameters
    ----------
    d_model
        Model width; divisible by `n_heads`.
    n_heads
        Number of attention heads.
    dropout
        Dropout on the attention probabilities (training only).
    bias
        Whether the projections have biases (BERT: yes).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def backend(self, x: Tensor) -> str:
        """The varlen kernel this module would use for `x` in its current train/eval mode."""
        return attention_backend(x, dropout=self._dropout_p(), head_dim=self.head_dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Attention over a padded batch.

        Parameters
        ----------
        x
            Activations [B, L, D].
        padding_mask
            [B, L], True where padded; padded keys are never attended to. None: no padding,
            which lets SDPA use its flash kernel on GPU.

        Returns
        -------
        [B, L, D]; rows at padded positions are finite but meaningless.
        """
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        attn_mask = None if padding_mask is None else key_padding_attn_mask(padding_mask)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self._dropout_p()
        )
        return self.out(o.transpose(1, 2).reshape(batch, length, self.d_model))

    def forward_varlen(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Attention over a padding-free batch; each cell attends only within itself.

        Parameters
        ----------
        x
            Activations [T, D] of all cells concatenated.
        cu_seqlens
            Cumulative cell lengths [B + 1], int32, starting at 0, on the device of `x`.
        max_seqlen
            Length of the longest cell.

        Returns
        -------
        [T, D].
        """
        total = x.shape[0]
        qkv = self.qkv(x).view(total, 3, self.n_heads, self.head_dim)
        dropout_p = self._dropout_p()
        backend = attention_backend(qkv, dropout=dropout_p, head_dim=self.head_dim)
        if backend == "flash_attn":
            kernel = _flash_attn_varlen_qkvpacked()
            o = kernel(qkv, cu_seqlens.to(torch.int32), max_seqlen, dropout_p=dropout_p)
        elif backend == "torch_varlen":
            kernel = _torch_varlen_attn()
            q, k, v = qkv.unbind(1)  # [T, H, Dh] views; the kernel only needs a unit last stride
            cu = cu_seqlens.to(torch.int32)
            o = kernel(q, k, v, cu, cu, max_seqlen, max_seqlen)
        else:
            o = self._varlen_via_padding(qkv, cu_seqlens, max_seqlen, dropout_p)
        return self.out(o.reshape(total, self.d_model))

    def _varlen_via_padding(
        self, qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float
    ) -> Tensor:
        total = qkv.shape[0]
        n_cells = cu_seqlens.shape[0] - 1
        cell, position = varlen_index(cu_seqlens, total)
        padded = qkv.new_zeros(n_cells, max_seqlen, 3, self.n_heads, self.head_dim)
        padded = padded.index_put((cell, position), qkv)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        padding_mask = torch.arange(max_seqlen, device=qkv.device)[None, :] >= lengths[:, None]
        q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_padding_attn_mask(padding_mask), dropout_p=dropout_p
        )
        return o.transpose(1, 2)[cell, position]  # [T, H, Dh]
