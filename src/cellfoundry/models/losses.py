"""Losses and corruptions of the pretraining objectives as pure functions on tensors: masking,
masked cross-entropy, the CLIP loss, SEDD diffusion noise, score entropy and sampling.

Every function works on either input layout (padded [B, L] or varlen [T]) unless it says
otherwise. Random draws take an optional `torch.Generator`, which must live on the device of the
data; the same generator state gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "absorb",
    "clip_loss",
    "gather_with_grad",
    "loglinear_noise",
    "mask_tokens_bert",
    "mask_values",
    "masked_cross_entropy",
    "sample_absorbing",
    "sample_diffusion_times",
    "sedd_log_score",
    "sedd_score_entropy_loss",
]

IGNORE_INDEX = -100  # label of positions without a target (PyTorch's and Hugging Face's default)


# A source of randomness: a torch.Generator, or a function giving uniforms in [0, 1) shaped
# like its argument (the data loader passes one that hashes cell ids and positions, so a cell
# gets the same draws however a batch is split across ranks).
Noise = torch.Generator | Callable[[Tensor], Tensor] | None


def _uniform(like: Tensor, generator: Noise) -> Tensor:
    if callable(generator) and not isinstance(generator, torch.Generator):
        return generator(like).to(like.device)
    return torch.rand(like.shape, generator=generator, device=like.device)


# ----------------------------------------------------------------------------- masked modeling


def mask_tokens_bert(
    tokens: Tensor,
    special_mask: Tensor,
    *,
    mask_ratio: float = 0.15,
    mask_token_id: int = 2,
    vocab_low: int = 3,
    vocab_high: int,
    generator: Noise = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """BERT masking (as Hugging Face's ``DataCollatorForLanguageModeling``, Geneformer's).

    Each non-special position is selected with probability `mask_ratio`; of the selected, 80%
    become ``<mask>``, 10% a random gene token, 10% stay unchanged.

    Parameters
    ----------
    tokens
        Gene token ids, any shape.
    special_mask
        True where a position must never be selected (``<cls>``, ``<pad>``, ...).
    mask_ratio
        Probability of selecting a position.
    mask_token_id
        Id of ``<mask>``.
    vocab_low, vocab_high
        Random replacements are drawn from ``[vocab_low, vocab_high)`` (the gene tokens).
    generator
        Source of randomness, on the device of `tokens`.

    Returns
    -------
    inputs
        The corrupted tokens.
    labels
        The original token at selected positions, `IGNORE_INDEX` elsewhere.
    mask
        True at selected positions.
    """
    selected = (_uniform(tokens, generator) < mask_ratio) & ~special_mask
    action = _uniform(tokens, generator)
    random_tokens = vocab_low + (_uniform(tokens, generator) * (vocab_high - vocab_low)).long()
    inputs = torch.where(selected & (action < 0.8), mask_token_id, tokens)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    labels = torch.where(selected, tokens, IGNORE_INDEX)
    return inputs, labels, selected


def mask_values(
    values: Tensor,
    special_mask: Tensor,
    *,
    mask_ratio: float,
    mask_value_id: int,
    generator: Noise = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked value modeling (scGPT-style): hide value bins, predict the original bins.

    Each non-special position is masked independently with probability `mask_ratio` (scGPT masks
    an exact fraction per cell; the Bernoulli version works in both layouts and differs by
    sampling noise only).

    Parameters
    ----------
    values
        Value ids, any shape.
    special_mask
        True where a position must never be masked.
    mask_ratio
        Probability of masking a position.
    mask_value_id
        The MASK value state (``n_bins``).
    generator
        Source of randomness, on the device of `values`.

    Returns
    -------
    inputs
        Values with the MASK state at masked positions.
    targets
        The original values (everywhere; use with `mask`).
    mask
        True at masked positions.
    """
    mask = (_uniform(values, generator) < mask_ratio) & ~special_mask
    return torch.where(mask, mask_value_id, values), values, mask


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy averaged over masked positions only.

    Positions outside `mask` (and targets equal to `IGNORE_INDEX`) get exactly zero gradient and
    do not enter the mean. Computed in fp32 whatever the logits' dtype.

    Parameters
    ----------
    logits
        [..., C]; either at every position or already gathered at the masked ones.
    targets
        [...] class ids.
    mask
        [...] True where the loss applies; None: wherever `targets` is not `IGNORE_INDEX`.

    Returns
    -------
    loss
        Mean cross-entropy over the counted positions (0 when there are none).
    accuracy
        Fraction of counted positions whose argmax is the target (no gradient).
    """
    targets = targets.long()
    if mask is not None:
        targets = torch.where(mask, targets, IGNORE_INDEX)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    counted = flat_targets != IGNORE_INDEX
    n = counted.sum().clamp_min(1)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = (flat_logits.argmax(dim=-1) == flat_targets) & counted
        accuracy = correct.sum() / n
    return loss / n, accuracy


# ----------------------------------------------------------------------------- contrastive


def gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate `z` [N, D] from all ranks along dim 0, keeping the autograd graph.

    Uses PyTorch's functional ``all_gather_single`` (``torch.distributed._functional_collectives``,
    the replacement of the deprecated ``torch.distributed.nn.functional.all_gather``, also
    traceable by ``torch.compile``), whose backward sums the incoming
    gradients of every rank into each local shard. When every rank then computes the same global
    loss, the local gradient is ``world_size`` times the gradient of that loss and DDP's gradient
    averaging divides it back: parameters receive exactly the gradient of the single-process loss
    on the global batch. Returns `z` itself when torch.distributed is not initialised or has one
    rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed._functional_collectives import all_gather_single

    gathered = all_gather_single(z.contiguous(), 0, dist.group.WORLD)
    # Waiting now returns a plain tensor (not an AsyncCollectiveTensor) with the graph intact;
    # the loss needs the data immediately anyway.
    return gathered.wait() if hasattr(gathered, "wait") else gathered


def clip_loss(
    z_a: Tensor, z_b: Tensor, logit_scale: Tensor, *, max_logit_scale: float = math.log(100.0)
) -> Tensor:
    """Symmetric InfoNCE between two views (CLIP): row i of `z_a` matches row i of `z_b`.

    Embeddings are L2-normalised here; logits are ``exp(logit_scale) * cos(z_a, z_b)``, with
    `logit_scale` = log(1 / temperature) clamped at log(100) as in CLIP (the clamp stops its
    gradient above the limit). For a global batch, pass ``gather_with_grad(z)`` of both views.

    Parameters
    ----------
    z_a, z_b
        Embeddings [N, D] of the two views of the same N cells.
    logit_scale
        Scalar learnable parameter (CLIP initialises it to log(1 / 0.07)).
    max_logit_scale
        Upper clamp of `logit_scale`.

    Returns
    -------
    Mean of the a->b and b->a cross-entropies (a scalar in fp32, or fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(z_a.dtype, torch.float32)  # fp32 for half inputs, fp64 stays
    z_a = F.normalize(z_a.to(dtype), dim=-1)
    z_b = F.normalize(z_b.to(dtype), dim=-1)
    scale = logit_scale.to(dtype).clamp(max=max_logit_scale).exp()
    logits = scale * z_a @ z_b.T
    labels = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ----------------------------------------------------------------------------- SEDD diffusion


def _expand_to(x: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims so that a per-cell `x` [B] broadcasts against `like` [B, ...]."""
    if any(a not in (1, b) for a, b in zip(x.shape, like.shape, strict=False)):
        # Without this check a per-cell sigma [B] would broadcast along the wrong axis of
        # flattened per-position inputs [N, ...].
        raise ValueError(
            f"noise of shape {tuple(x.shape)} does not align with the leading dimensions of "
            f"{tuple(like.shape)}; give one value per cell of a [B, L] input or one per position"
        )
    return x.reshape(*x.shape, *([1] * (like.dim() - x.dim())))


def loglinear_noise(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """SEDD's log-linear noise schedule (``noise_lib.LogLinearNoise``).

    ``sigma(t) = -log(1 - (1 - eps) t)`` (total noise) and
    ``dsigma(t) = (1 - eps) / (1 - (1 - eps) t)`` (its rate), so a position is masked at time t
    with probability ``1 - exp(-sigma) = (1 - eps) t``.

    Parameters
    ----------
    t
        Times in [0, 1].
    eps
        Keeps sigma finite at t = 1.

    Returns
    -------
    sigma, dsigma
        Same shape as `t`.
    """
    t = t.float()
    sigma = -torch.log1p(-(1.0 - eps) * t)
    dsigma = (1.0 - eps) / (1.0 - (1.0 - eps) * t)
    return sigma, dsigma


def sample_diffusion_times(
    n: int,
    *,
    eps: float = 1e-3,
    low_discrepancy: bool = False,
    generator: Noise = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-cell diffusion times t in [eps, 1] (SEDD: ``t = (1 - eps) u + eps``).

    Parameters
    ----------
    n
        Number of cells.
    eps
        Smallest time (SEDD's ``sampling_eps``), avoiding the unweighted t -> 0 end.
    low_discrepancy
        Stratify u over the batch, ``u_i = (u_0 + i / n) mod 1`` (as VDM/MDLM do), which
        lowers the variance of the batch loss without changing its expectation.
    generator
        Source of randomness, on `device`.
    device
        Where the times live.

    Returns
    -------
    Float tensor [n].
    """
    if low_discrepancy:
        u0 = _uniform(torch.empty(1, device=device), generator)
        u = (u0 + torch.arange(n, device=device) / n) % 1.0
    else:
        u = _uniform(torch.empty(n, device=device), generator)
    return (1.0 - eps) * u + eps


def absorb(
    values: Tensor,
    sigma: Tensor,
    *,
    mask_value_id: int,
    generator: Noise = None,
    special_mask: Tensor | None = None,
) -> Tensor:
    """Forward process of the absorbing graph: each position independently becomes MASK with
    probability ``1 - exp(-sigma)`` (SEDD's ``Absorbing.sample_transition``).

    Parameters
    ----------
    values
        Clean value ids x_0 ([B, L] or [T]).
    sigma
        Total noise per cell [B] (broadcast over positions) or per position (same shape as
        `values`; for varlen, repeat each cell's sigma over its tokens).
    mask_value_id
        The absorbing MASK state.
    generator
        Source of randomness, on the device of `values`.
    special_mask
        True where a position must never be masked (padding, ``<cls>``).

    Returns
    -------
    x_t, the noised value ids.
    """
    move_chance = -torch.expm1(-_expand_to(sigma, values).float())
    move = _uniform(values, generator) < move_chance
    if special_mask is not None:
        move = move & ~special_mask
    return torch.where(move, mask_value_id, values)


def sedd_log_score(output: Tensor, sigma: Tensor) -> Tensor:
    """Log concrete scores from the raw value-head output (SEDD's ``scale_by_sigma``).

    For the absorbing graph the true score of a MASK position is
    ``p(x_0 = y | rest) / (exp(sigma) - 1)``, so SEDD lets the network output something like
    log-probabilities and shifts them: ``log_score = output - log(expm1(sigma)) - log(n_states)``
    (the last term centres a uniform output). The MASK class is left out: `output` has one
    column per real state (``ValueHead(d_model, n_bins)``), never a column for MASK; SEDD sets
    that entry (and the entry of the current state) to log 1 = 0, which the loss and the sampler
    below treat analytically.

    Parameters
    ----------
    output
        Head output [..., n_states] (one column per real value id).
    sigma
        Per-cell [B] or per-position noise, broadcast against ``output[..., 0]``.

    Returns
    -------
    fp32 log-scores with the shape of `output`.
    """
    n_states = output.shape[-1]
    sigma = _expand_to(sigma.float(), output)
    return output.float() - torch.log(torch.expm1(sigma)) - math.log(n_states)


def sedd_score_entropy_loss(
    log_score: Tensor,
    x_t: Tensor,
    x_0: Tensor,
    sigma: Tensor,
    dsigma: Tensor,
    *,
    mask_value_id: int,
    reduction: Literal["mean", "sum", "none"] = "mean",
    n_cells: int | None = None,
) -> Tensor:
    """Diffusion-weighted denoising score entropy for the absorbing graph.

    Lou, Meng & Ermon (2024), "Discrete Diffusion Modeling by Estimating the Ratios of the Data
    Distribution" (ICML), code ``graph_lib.Absorbing.score_entropy`` and ``losses.get_loss_fn``.
    Only positions with ``x_t == MASK`` contribute; with ``ratio = 1 / expm1(sigma)`` (the true
    ratio ``p(x_0) / p(MASK)``) and ``s = log_score``::

        entropy = sum_{y != MASK} exp(s_y) - ratio * s_{x_0} + ratio * (log(ratio) - 1)

    which is >= 0 and 0 exactly when ``exp(s_{x_0}) = ratio`` and the other scores vanish. The
    training loss weights each position by the schedule's rate, ``dsigma * entropy``, sums over
    the positions of a cell, and SEDD averages over cells (``reduction="mean"``).

    Parameters
    ----------
    log_score
        [..., n_states] log-scores of the real states (`sedd_log_score`), at every position or
        only at selected ones.
    x_t
        [...] noised ids; MASK marks the positions that count.
    x_0
        [...] clean ids (real states).
    sigma, dsigma
        Noise and rate per cell [B] (padded [B, L] inputs) or per position.
    mask_value_id
        The MASK state.
    reduction
        ``"mean"``: sum over positions / number of cells (SEDD); ``"sum"``; ``"none"``:
        per-position losses with the shape of `x_t` (zero where unmasked).
    n_cells
        Number of cells for ``"mean"``; defaults to ``x_t.shape[0]`` for 2-D (padded) inputs and
        is required otherwise.

    Returns
    -------
    fp32 loss.
    """
    rel = x_t == mask_value_id
    sigma = _expand_to(sigma.float(), x_t)
    dsigma = _expand_to(dsigma.float(), x_t)
    # Unmasked rows are replaced by zeros before exp: their gradient is then exactly 0 and an
    # overflowing score there cannot turn into 0 * inf = NaN.
    s = torch.where(rel.unsqueeze(-1), log_score.float(), 0.0)
    ratio = 1.0 / torch.expm1(sigma)
    x0 = torch.where(rel, x_0, 0).long()
    neg_term = ratio * s.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    pos_term = s.exp().sum(dim=-1)
    const = ratio * (torch.log(ratio) - 1.0)
    loss = torch.where(rel, dsigma * (pos_term - neg_term + const), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if n_cells is None:
        if x_t.dim() != 2:
            raise ValueError("n_cells is required for reduction='mean' unless x_t is [B, L]")
        n_cells = x_t.shape[0]
    return loss.sum() / n_cells


def _sample_categorical(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index drawn proportionally to non-negative `weights` along the last dim (exponential race,
    SEDD's ``catsample``); the weights need not sum to one."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device)
    race = -torch.log(u.clamp_min(1e-20))  # Exp(1) draws; argmax(w / E) ~ Categorical(w)
    return (weights / race).argmax(dim=-1)


@torch.no_grad()
def sample_absorbing(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    n_positions: int,
    steps: int,
    *,
    mask_value_id: int,
    n_cells: int = 1,
    x_init: Tensor | None = None,
    noise_eps: float = 1e-3,
    t_eps: float = 1e-5,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample value ids with SEDD's analytic (Tweedie tau-leaping) sampler, absorbing graph.

    Starts from all MASK (or `x_init`) at t = 1 and walks ``steps`` uniform steps down to
    `t_eps` (``sampling.get_pc_sampler`` with the ``analytic`` predictor). For the absorbing
    graph the staggered-score update has a closed form: from noise sigma to sigma - delta, a MASK
    position becomes value y with weight ``score_y * expm1(delta)`` and stays MASK with weight
    ``1 - expm1(delta) * sum_y score_y``. With exact scores this is ancestral unmasking, as in
    masked diffusion models: unmask with probability ``expm1(delta) / expm1(sigma)`` and draw
    the value from the model's ``p(x_0 | x_t)``. A final denoising step (SEDD's
    ``noise_removal``) draws every remaining MASK from the scores of the real states, so no
    MASK is left when `denoise` is True. Positions that are not MASK never change.

    Parameters
    ----------
    model_fn
        ``model_fn(x_t [n_cells, n_positions], sigma [n_cells]) -> log_score`` [n_cells,
        n_positions, n_states] (`sedd_log_score` of the network output), in eval mode.
    n_positions
        Positions per cell.
    steps
        Number of predictor steps.
    mask_value_id
        The MASK state (``n_states``).
    n_cells
        Number of cells to sample (ignored when `x_init` is given).
    x_init
        Optional [n_cells, n_positions] start; its non-MASK entries are kept (imputation).
    noise_eps
        `loglinear_noise` epsilon.
    t_eps
        Final time of the walk (SEDD samples down to 1e-5).
    denoise
        Run the final denoising step.
    generator
        Source of randomness, on `device`.
    device
        Where to sample (defaults to the device of `x_init`, else CPU).

    Returns
    -------
    LongTensor [n_cells, n_positions] of value ids.
    """
    if x_init is not None:
        x = x_init.clone().long()
    else:
        x = torch.full((n_cells, n_positions), mask_value_id, dtype=torch.long, device=device)
    times = torch.linspace(1.0, t_eps, steps + 1, device=x.device)
    sigmas, _ = loglinear_noise(times, eps=noise_eps)
    ones = torch.ones(x.shape[0], device=x.device)
    for i in range(steps):
        sigma, delta = sigmas[i], sigmas[i] - sigmas[i + 1]
        score = model_fn(x, sigma * ones).float().exp()
        grow = torch.expm1(delta)
        stay = (1.0 - grow * score.sum(dim=-1, keepdim=True)).clamp_min(0.0)
        choice = _sample_categorical(torch.cat([score * grow, stay], dim=-1), generator)
        is_mask = x == mask_value_id
        x = torch.where(is_mask & (choice < score.shape[-1]), choice, x)
    if denoise:
        score = model_fn(x, sigmas[-1] * ones).float().exp()
        x = torch.where(x == mask_value_id, _sample_categorical(score, generator), x)
    return x
