"""Objectives: masking, masked cross-entropy, CLIP loss (incl. 2-rank gloo), SEDD diffusion."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cellfoundry.models.losses import (
    IGNORE_INDEX,
    absorb,
    clip_loss,
    gather_with_grad,
    loglinear_noise,
    mask_tokens_bert,
    mask_values,
    masked_cross_entropy,
    sample_absorbing,
    sample_diffusion_times,
    sedd_log_score,
    sedd_score_entropy_loss,
)

N_BINS = 6
MASK_VALUE = N_BINS


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cells(batch: int = 4, length: int = 32, seed: int = 0):
    g = _gen(seed)
    tokens = torch.randint(3, 100, (batch, length), generator=g)
    tokens[:, 0] = 0
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    tokens[padding] = 1
    special = tokens < 3
    return tokens, special


# ----------------------------------------------------------------------------- masking


def test_mask_tokens_bert_is_deterministic_and_skips_specials():
    tokens, special = _cells()
    a = mask_tokens_bert(tokens, special, vocab_high=100, generator=_gen(3))
    b = mask_tokens_bert(tokens, special, vocab_high=100, generator=_gen(3))
    c = mask_tokens_bert(tokens, special, vocab_high=100, generator=_gen(4))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[2], c[2])
    inputs, labels, mask = a
    assert not (mask & special).any()
    assert torch.equal(inputs[special], tokens[special])
    assert (labels[~mask] == IGNORE_INDEX).all()
    assert torch.equal(labels[mask], tokens[mask])


def test_mask_tokens_bert_proportions():
    tokens = torch.randint(3, 1000, (200, 1000), generator=_gen(1))
    special = torch.zeros_like(tokens, dtype=torch.bool)
    special[:, :100] = True
    inputs, _, mask = mask_tokens_bert(
        tokens, special, mask_ratio=0.15, vocab_high=1000, generator=_gen(2)
    )
    n_eligible = (~special).sum().item()
    assert mask.sum().item() / n_eligible == pytest.approx(0.15, abs=0.003)
    n = mask.sum().item()
    to_mask = (inputs[mask] == 2).sum().item() / n
    unchanged = (inputs[mask] == tokens[mask]).sum().item() / n
    randomised = 1.0 - to_mask - unchanged
    assert to_mask == pytest.approx(0.8, abs=0.01)
    # A random draw equals the original token 1 / 997 of the time; within tolerance.
    assert unchanged == pytest.approx(0.1, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01)
    assert inputs[mask].min() >= 2
    assert inputs[mask].max() < 1000


def test_mask_values():
    tokens, special = _cells()
    values = torch.randint(0, N_BINS, tokens.shape, generator=_gen(5))
    inputs, targets, mask = mask_values(
        values, special, mask_ratio=0.4, mask_value_id=MASK_VALUE, generator=_gen(6)
    )
    again = mask_values(
        values, special, mask_ratio=0.4, mask_value_id=MASK_VALUE, generator=_gen(6)
    )
    assert torch.equal(mask, again[2])
    assert not (mask & special).any()
    assert (inputs[mask] == MASK_VALUE).all()
    assert torch.equal(inputs[~mask], values[~mask])
    assert torch.equal(targets, values)
    assert 0.25 < mask.sum() / (~special).sum() < 0.55


# ----------------------------------------------------------------------------- cross-entropy


def test_masked_cross_entropy_ignores_unmasked_positions():
    g = _gen(7)
    logits = torch.randn(3, 10, 20, generator=g, requires_grad=True)
    targets = torch.randint(0, 20, (3, 10), generator=g)
    mask = torch.rand(3, 10, generator=g) < 0.3
    loss, accuracy = masked_cross_entropy(logits, targets, mask)
    loss.backward()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask] != 0).any()
    expected = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)
    expected_accuracy = (logits[mask].argmax(-1) == targets[mask]).float().mean()
    torch.testing.assert_close(accuracy, expected_accuracy)

    # Anything outside the mask, even inf, changes neither the loss nor the masked gradients.
    perturbed = logits.detach().clone()
    perturbed[~mask] = torch.randn_like(perturbed[~mask]) * 100
    perturbed[0][~mask[0]] = float("inf")
    perturbed.requires_grad_(True)
    loss2, _ = masked_cross_entropy(perturbed, targets, mask)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(perturbed.grad[mask], logits.grad[mask])


def test_masked_cross_entropy_with_labels_and_empty_mask():
    logits = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([1, IGNORE_INDEX, 3, IGNORE_INDEX, 0])
    loss, _ = masked_cross_entropy(logits, labels)
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))
    empty, accuracy = masked_cross_entropy(logits, labels, torch.zeros(5, dtype=torch.bool))
    assert empty.item() == 0.0
    assert accuracy.item() == 0.0
    empty.backward()
    assert (logits.grad == 0).all()


# ----------------------------------------------------------------------------- contrastive


def _reference_clip(z_a, z_b, logit_scale):
    z_a, z_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    logits = logit_scale.clamp(max=math.log(100)).exp() * z_a @ z_b.T
    labels = torch.arange(len(z_a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_clip_loss():
    g = _gen(8)
    z_a, z_b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    torch.testing.assert_close(clip_loss(z_a, z_b, scale), _reference_clip(z_a, z_b, scale))
    torch.testing.assert_close(clip_loss(z_a, z_b, scale), clip_loss(z_b, z_a, scale))
    aligned = clip_loss(z_a, z_a * 3.0, torch.tensor(math.log(100)))
    assert aligned < clip_loss(z_a, z_b, torch.tensor(math.log(100)))
    # The temperature is clamped at 1/100: beyond it the loss and its gradient stop moving.
    big = torch.tensor(10.0, requires_grad=True)
    clip_loss(z_a, z_b, big).backward()
    assert big.grad == 0
    torch.testing.assert_close(
        clip_loss(z_a, z_b, torch.tensor(10.0)), clip_loss(z_a, z_b, torch.tensor(math.log(100)))
    )


def test_gather_with_grad_is_noop_without_distributed():
    z = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(z) is z


WORLD = 2
BATCH = 6  # global; 3 cells per rank


def _contrastive_problem():
    # fp64: sharded and full-batch matmuls may round differently (BLAS blocking, threads).
    g = _gen(11)
    x_a, x_b, weight = (
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((BATCH, 5), (BATCH, 5), (5, 4))
    )
    return x_a, x_b, weight, torch.tensor(math.log(1 / 0.07), dtype=torch.float64)


def _distributed_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_a, x_b, weight, scale = _contrastive_problem()
        weight.requires_grad_(True)
        scale.requires_grad_(True)
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        z_a = gather_with_grad(x_a[shard] @ weight)
        z_b = gather_with_grad(x_b[shard] @ weight)
        loss = clip_loss(z_a, z_b, scale)
        loss.backward()
        # What DDP does with parameter gradients: average them over ranks.
        grads = torch.cat([weight.grad.flatten(), scale.grad.reshape(1)])
        dist.all_reduce(grads)
        grads /= WORLD
        if rank == 0:
            torch.save(
                {
                    "loss": loss.detach(),
                    "z_a": z_a.detach(),
                    "weight_grad": grads[:-1],
                    "scale_grad": grads[-1],
                },
                out_file,
            )
        # Tear down together: a rank leaving while its peer still talks to it can abort gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gather_with_grad_two_ranks_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    out_file = tmp_path / "rank0.pt"
    mp.spawn(
        _distributed_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True
    )
    result = torch.load(out_file)

    x_a, x_b, weight, scale = _contrastive_problem()
    weight.requires_grad_(True)
    scale.requires_grad_(True)
    loss = clip_loss(x_a @ weight, x_b @ weight, scale)
    loss.backward()
    torch.testing.assert_close(result["z_a"], (x_a @ weight).detach())
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(result["weight_grad"], weight.grad.flatten())
    torch.testing.assert_close(result["scale_grad"], scale.grad)


# ----------------------------------------------------------------------------- SEDD


def test_loglinear_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0], dtype=torch.float64, requires_grad=True)
    sigma, dsigma = loglinear_noise(t)
    assert torch.isfinite(sigma).all()
    assert sigma[0] == 0
    torch.testing.assert_close(-torch.expm1(-sigma), (1 - 1e-3) * t.detach().float())
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(dsigma, grad.float())


def test_sample_diffusion_times():
    t = sample_diffusion_times(1000, generator=_gen(1))
    assert t.min() >= 1e-3
    assert t.max() <= 1.0
    strat = sample_diffusion_times(8, low_discrepancy=True, generator=_gen(1)).sort().values
    gaps = (strat[1:] - strat[:-1]) / (1 - 1e-3)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))
    assert torch.equal(
        sample_diffusion_times(8, low_discrepancy=True, generator=_gen(2)),
        sample_diffusion_times(8, low_discrepancy=True, generator=_gen(2)),
    )


def test_absorb():
    values = torch.randint(0, N_BINS, (4, 5000), generator=_gen(1))
    special = torch.zeros_like(values, dtype=torch.bool)
    special[:, :10] = True
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    sigma, _ = loglinear_noise(t)
    x_t = absorb(values, sigma, mask_value_id=MASK_VALUE, generator=_gen(2), special_mask=special)
    masked = x_t == MASK_VALUE
    assert not (masked & special).any()
    assert torch.equal(x_t[~masked], values[~masked])
    rate = masked[:, 10:].float().mean(dim=1)
    torch.testing.assert_close(rate, (1 - 1e-3) * t, atol=0.02, rtol=0)
    again = absorb(values, sigma, mask_value_id=MASK_VALUE, generator=_gen(2), special_mask=special)
    assert torch.equal(x_t, again)
    # Per-position sigma (varlen layout) gives the same draw as per-cell sigma.
    flat = absorb(
        values.flatten(),
        sigma.repeat_interleave(5000),
        mask_value_id=MASK_VALUE,
        generator=_gen(2),
        special_mask=special.flatten(),
    )
    assert torch.equal(flat, x_t.flatten())


def _reference_score_entropy(score, sigma, x, x0, dim):
    """SEDD's ``graph_lib.Absorbing.score_entropy`` transcribed; `score` has dim + 1 columns
    (MASK last) and `dim` real states."""
    rel_ind = x == dim
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    ratio = 1 / esigm1.expand_as(x)[rel_ind]
    other_ind = x0[rel_ind]
    neg_term = ratio * torch.gather(score[rel_ind], -1, other_ind[..., None]).squeeze(-1)
    pos_term = score[rel_ind][:, :-1].exp().sum(dim=-1)
    const = ratio * (ratio.log() - 1)
    entropy = torch.zeros(*x.shape)
    entropy[rel_ind] += pos_term - neg_term + const
    return entropy


def _diffusion_batch(seed: int = 0):
    g = _gen(seed)
    x_0 = torch.randint(0, N_BINS, (4, 12), generator=g)
    t = sample_diffusion_times(4, generator=g)
    sigma, dsigma = loglinear_noise(t)
    x_t = absorb(x_0, sigma, mask_value_id=MASK_VALUE, generator=g)
    return x_0, x_t, sigma, dsigma


def test_sedd_loss_matches_reference_implementation():
    x_0, x_t, sigma, dsigma = _diffusion_batch()
    output = torch.randn(4, 12, N_BINS, generator=_gen(9))
    log_score = sedd_log_score(output, sigma)
    ours = sedd_score_entropy_loss(log_score, x_t, x_0, sigma, dsigma, mask_value_id=MASK_VALUE)
    with_mask_column = torch.cat([log_score, torch.zeros(4, 12, 1)], dim=-1)
    entropy = _reference_score_entropy(with_mask_column, sigma[:, None], x_t, x_0, N_BINS)
    expected = (dsigma[:, None] * entropy).sum(dim=-1).mean()
    torch.testing.assert_close(ours, expected)
    assert torch.isfinite(ours)
    assert ours > 0
    per_position = sedd_score_entropy_loss(
        log_score, x_t, x_0, sigma, dsigma, mask_value_id=MASK_VALUE, reduction="none"
    )
    assert per_position.shape == x_t.shape
    assert (per_position >= -1e-5).all()
    # Varlen layout: per-position sigma, cell count given.
    rep = lambda v: v[:, None].expand(4, 12).flatten()  # noqa: E731
    flat = sedd_score_entropy_loss(
        log_score.flatten(0, 1),
        x_t.flatten(),
        x_0.flatten(),
        rep(sigma),
        rep(dsigma),
        mask_value_id=MASK_VALUE,
        n_cells=4,
    )
    torch.testing.assert_close(flat, ours)
    with pytest.raises(ValueError, match="align"):
        sedd_log_score(output.flatten(0, 1), sigma)  # per-cell noise for per-position rows


def test_sedd_loss_ignores_unmasked_positions():
    x_0, x_t, sigma, dsigma = _diffusion_batch(1)
    unmasked = x_t != MASK_VALUE
    assert unmasked.any()
    assert (~unmasked).any()
    log_score = torch.randn(4, 12, N_BINS, generator=_gen(2), requires_grad=True)
    loss = sedd_score_entropy_loss(log_score, x_t, x_0, sigma, dsigma, mask_value_id=MASK_VALUE)
    loss.backward()
    assert (log_score.grad[unmasked] == 0).all()

    perturbed = log_score.detach().clone()
    perturbed[unmasked] = 1e4  # would overflow exp() if it were used
    perturbed.requires_grad_(True)
    loss2 = sedd_score_entropy_loss(perturbed, x_t, x_0, sigma, dsigma, mask_value_id=MASK_VALUE)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    assert torch.isfinite(perturbed.grad).all()
    assert (perturbed.grad[unmasked] == 0).all()


def test_sedd_loss_is_minimal_at_true_ratio():
    x_0, x_t, sigma, dsigma = _diffusion_batch(2)
    ratio = 1.0 / torch.expm1(sigma)
    perfect = torch.full((4, 12, N_BINS), -40.0)
    perfect.scatter_(-1, x_0[..., None], ratio.log()[:, None, None].expand(4, 12, 1))
    random = sedd_log_score(torch.randn(4, 12, N_BINS, generator=_gen(3)), sigma)
    kwargs = {"mask_value_id": MASK_VALUE}
    best = sedd_score_entropy_loss(perfect, x_t, x_0, sigma, dsigma, **kwargs)
    worse = sedd_score_entropy_loss(random, x_t, x_0, sigma, dsigma, **kwargs)
    assert best.abs() < 1e-4
    assert worse > best + 0.1
    # Moving the prediction toward x_0 lowers the loss monotonically.
    losses = [
        sedd_score_entropy_loss(random + a * (perfect - random), x_t, x_0, sigma, dsigma, **kwargs)
        for a in (0.0, 0.5, 0.9, 1.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(losses))


def _oracle(probs: torch.Tensor):
    """A model that knows the (position-independent) distribution of every position."""
    output = (probs.log() + math.log(probs.shape[-1])).clone()

    def model_fn(x, sigma):
        return sedd_log_score(output.expand(*x.shape, -1), sigma)

    return model_fn


def test_sample_absorbing():
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    model_fn = _oracle(probs)
    samples = sample_absorbing(
        model_fn, 8, 16, mask_value_id=MASK_VALUE, n_cells=1000, generator=_gen(4)
    )
    assert samples.shape == (1000, 8)
    assert not (samples == MASK_VALUE).any()
    assert samples.min() >= 0
    assert samples.max() < N_BINS
    frequencies = torch.bincount(samples.flatten(), minlength=N_BINS).float() / samples.numel()
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)
    again = sample_absorbing(
        model_fn, 8, 16, mask_value_id=MASK_VALUE, n_cells=1000, generator=_gen(4)
    )
    assert torch.equal(samples, again)

    # Known values are kept (imputation); without the final denoising step, MASK may remain.
    x_init = torch.full((50, 8), MASK_VALUE)
    x_init[:, :3] = 4
    imputed = sample_absorbing(
        model_fn, 8, 4, mask_value_id=MASK_VALUE, x_init=x_init, generator=_gen(5)
    )
    assert (imputed[:, :3] == 4).all()
    assert not (imputed == MASK_VALUE).any()
    partial = sample_absorbing(
        model_fn,
        8,
        2,
        mask_value_id=MASK_VALUE,
        n_cells=200,
        denoise=False,
        t_eps=0.5,
        generator=_gen(6),
    )
    assert (partial == MASK_VALUE).any()
