"""Models: attention paths, encoder layouts, heads, gene-embedding adapter, Hugging Face export."""

from __future__ import annotations

import pytest
import torch

from cellfoundry.models import (
    BertMLMHead,
    EncoderConfig,
    ProjectionHead,
    SelfAttention,
    TimeEmbedding,
    TranscriptomeEncoder,
    ValueHead,
    attention_backend,
)
from cellfoundry.models.attention import varlen_index

VOCAB = 50
N_BINS = 7

BERT = EncoderConfig(
    vocab_size=VOCAB,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    max_len=24,
    dropout=0.1,
    attention_dropout=0.02,
    norm_first=False,
    activation="gelu",
)
MODERN = EncoderConfig(
    vocab_size=VOCAB,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    max_len=24,
    dropout=0.02,
    attention_dropout=0.02,
    activation="gelu",
    n_values=N_BINS + 1,
    position="none",
    norm_first=True,
    type_vocab_size=0,
    layer_norm_eps=1e-5,
)
CONFIGS = {"bert": BERT, "modern_values": MODERN}
LENGTHS = [9, 4, 12, 1]


def _encoder(config: EncoderConfig, seed: int = 0, **kwargs) -> TranscriptomeEncoder:
    torch.manual_seed(seed)
    encoder = TranscriptomeEncoder(config, **kwargs)
    # Larger-than-init weights so that every path is exercised with non-trivial attention.
    with torch.no_grad():
        for p in encoder.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return encoder.eval()


def _padded_batch(config: EncoderConfig, lengths: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    padding_mask = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    tokens = torch.randint(3, config.vocab_size, (batch, length), generator=g)
    tokens[:, 0] = 0  # <cls>
    tokens[padding_mask] = config.pad_token_id
    values = None
    if config.n_values > 0:
        values = torch.randint(0, config.n_values, (batch, length), generator=g)
        values[padding_mask] = 0
    return tokens, values, padding_mask


def _to_varlen(tokens, values, padding_mask):
    lengths = (~padding_mask).sum(1)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    keep = ~padding_mask
    return tokens[keep], None if values is None else values[keep], cu_seqlens, int(lengths.max())


# ----------------------------------------------------------------------------- attention


def test_attention_backend_on_cpu_is_padded_fallback():
    x = torch.randn(5, 32)
    assert attention_backend(x) == "sdpa_padded"
    assert attention_backend(x.bfloat16()) == "sdpa_padded"
    assert SelfAttention(32, 4).backend(x) == "sdpa_padded"


def test_torch_varlen_attn_is_cuda_only():
    # Documents why the CPU path is the padded fallback: PyTorch's kernel has no CPU backend.
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises((NotImplementedError, RuntimeError)):
        varlen.varlen_attn(q, q, q, cu, cu, 4, 4)


def test_varlen_index():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # includes an empty cell
    cell, position = varlen_index(cu, 5)
    assert cell.tolist() == [0, 0, 0, 2, 2]
    assert position.tolist() == [0, 1, 2, 0, 1]


def test_attention_varlen_fallback_matches_padded():
    torch.manual_seed(0)
    attention = SelfAttention(32, 4).eval()
    lengths = [5, 1, 8, 3]
    padding_mask = torch.arange(8)[None, :] >= torch.tensor(lengths)[:, None]
    x = torch.randn(4, 8, 32)
    padded = attention(x, padding_mask)
    cu = torch.tensor([0, 5, 6, 14, 17], dtype=torch.int32)
    varlen = attention.forward_varlen(x[~padding_mask], cu, 8)
    torch.testing.assert_close(varlen, padded[~padding_mask], atol=1e-6, rtol=1e-5)


def test_attention_fully_padded_cell_is_finite():
    attention = SelfAttention(16, 2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    padding_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    out = attention(x, padding_mask)
    assert torch.isfinite(out).all()
    (out[~padding_mask]).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all()  # nothing of the empty cell reaches a real position


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_varlen_gpu_kernels_match_padded(dtype):
    torch.manual_seed(0)
    attention = SelfAttention(128, 2).cuda().eval().to(dtype)
    lengths = [37, 5, 64, 20]
    padding_mask = (
        torch.arange(64, device="cuda")[None, :] >= torch.tensor(lengths, device="cuda")[:, None]
    )
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype)
    cu = torch.zeros(5, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    assert attention.backend(x) in ("flash_attn", "torch_varlen")
    varlen = attention.forward_varlen(x[~padding_mask], cu, 64)
    padded = attention(x, padding_mask)[~padding_mask]
    torch.testing.assert_close(varlen.float(), padded.float(), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_never_attends(name):
    config = CONFIGS[name]
    encoder = _encoder(config)
    tokens, values, padding_mask = _padded_batch(config, LENGTHS)
    with torch.no_grad():
        reference = encoder(tokens, values, padding_mask)
        g = torch.Generator().manual_seed(7)
        noisy_tokens = torch.where(
            padding_mask, torch.randint(0, VOCAB, tokens.shape, generator=g), tokens
        )
        noisy_values = None
        if values is not None:
            noisy_values = torch.where(
                padding_mask, torch.randint(0, config.n_values, values.shape, generator=g), values
            )
        perturbed = encoder(noisy_tokens, noisy_values, padding_mask)
    real = ~padding_mask
    assert not torch.equal(noisy_tokens, tokens)
    torch.testing.assert_close(perturbed[real], reference[real], atol=1e-6, rtol=0)
    assert torch.isfinite(perturbed).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_varlen_matches_padded(name):
    config = CONFIGS[name]
    encoder = _encoder(config)
    tokens, values, padding_mask = _padded_batch(config, LENGTHS)
    condition = torch.randn(len(LENGTHS), config.d_model)
    with torch.no_grad():
        padded = encoder(tokens, values, padding_mask, condition=condition)
        varlen = encoder.forward_varlen(
            *_to_varlen(tokens, values, padding_mask), condition=condition
        )
    torch.testing.assert_close(varlen, padded[~padding_mask], atol=1e-5, rtol=1e-5)


def test_varlen_matches_padded_gradients():
    encoder = _encoder(MODERN)
    tokens, values, padding_mask = _padded_batch(MODERN, LENGTHS)
    weight = torch.randn(int((~padding_mask).sum()), MODERN.d_model)
    encoder(tokens, values, padding_mask)[~padding_mask].mul(weight).sum().backward()
    padded_grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    encoder.forward_varlen(*_to_varlen(tokens, values, padding_mask)).mul(weight).sum().backward()
    for a, b in zip(padded_grads, (p.grad for p in encoder.parameters()), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    from dataclasses import replace

    tokens, values, padding_mask = _padded_batch(MODERN, LENGTHS)
    grads = []
    for checkpointing in (False, True):
        encoder = _encoder(replace(MODERN, gradient_checkpointing=checkpointing)).train()
        torch.manual_seed(5)  # same dropout draws in both runs
        encoder.forward_varlen(*_to_varlen(tokens, values, padding_mask)).square().sum().backward()
        encoder(tokens, values, padding_mask)[~padding_mask].sum().backward()
        grads.append([p.grad for p in encoder.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_encoder_init_is_bert_style():
    encoder = TranscriptomeEncoder(BERT)
    w = encoder.layers[0].ffn.fc1.weight
    assert abs(w.std().item() - BERT.initializer_range) < 0.005
    assert (encoder.layers[0].ffn.fc1.bias == 0).all()
    assert (encoder.layers[0].attention_norm.weight == 1).all()
    assert (encoder.token_embedding.weight[BERT.pad_token_id] == 0).all()


def test_encoder_rejects_bad_inputs():
    encoder = TranscriptomeEncoder(MODERN)
    tokens = torch.full((1, 4), 5)
    with pytest.raises(ValueError, match="values is None"):
        encoder(tokens)
    with pytest.raises(ValueError, match="max_len"):
        TranscriptomeEncoder(BERT)(torch.full((1, BERT.max_len + 1), 5))
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(vocab_size=10, d_model=30, n_heads=4)


def test_gene_embedding_adapter():
    from dataclasses import replace

    config = replace(MODERN, gene_embedding_dim=12)
    gene_embeddings = torch.randn(VOCAB, 12)
    gene_embeddings[:3] = 0  # special tokens
    encoder = _encoder(config, gene_embeddings=gene_embeddings).train()
    embeddings = encoder.embeddings
    assert embeddings.gene_adapter.weight.shape == (config.d_model, 12)
    assert not any(p is embeddings.gene_embeddings for p in encoder.parameters())
    assert "embeddings.gene_embeddings" in encoder.state_dict()

    tokens, values, padding_mask = _padded_batch(config, LENGTHS)
    before = embeddings.gene_embeddings.clone()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=0.1)
    out = encoder(tokens, values, padding_mask)
    assert out.shape == (*tokens.shape, config.d_model)
    out[~padding_mask].square().sum().backward()
    assert embeddings.gene_adapter.weight.grad is not None
    optimizer.step()
    assert torch.equal(embeddings.gene_embeddings, before)

    # The gene vectors change the representation of genes, through the adapter.
    other = TranscriptomeEncoder(config, gene_embeddings=torch.zeros(VOCAB, 12))
    other.load_state_dict(encoder.state_dict())
    assert torch.equal(other.embeddings.gene_embeddings, before)

    with pytest.raises(ValueError, match="shape"):
        TranscriptomeEncoder(config, gene_embeddings=torch.zeros(VOCAB, 5))
    with pytest.raises(ValueError, match="gene_embedding_dim"):
        TranscriptomeEncoder(MODERN, gene_embeddings=gene_embeddings)


# ----------------------------------------------------------------------------- heads


def test_mlm_head_tied_and_selects_positions():
    encoder = _encoder(BERT)
    head = BertMLMHead(BERT, encoder.token_embedding).eval()
    assert head.decoder.weight is encoder.token_embedding.weight
    tokens, _, padding_mask = _padded_batch(BERT, LENGTHS)
    with torch.no_grad():
        hidden = encoder(tokens, None, padding_mask)
        full = head(hidden)
        selected = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.3
        by_mask = head(hidden, selected)
        by_index = head(hidden, selected.reshape(-1).nonzero().squeeze(-1))
    assert full.shape == (*tokens.shape, VOCAB)
    torch.testing.assert_close(by_mask, full[selected])
    torch.testing.assert_close(by_index, full[selected])


def test_value_head_shapes():
    head = ValueHead(32, N_BINS)
    hidden = torch.randn(3, 5, 32)
    assert head(hidden).shape == (3, 5, N_BINS)
    assert head(hidden, torch.tensor([0, 7, 14])).shape == (3, N_BINS)
    assert ValueHead(32, N_BINS, transform=False)(hidden).shape == (3, 5, N_BINS)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_projection_head_pooling_layouts_agree(pooling):
    head = ProjectionHead(32, 16, pooling=pooling)
    lengths = [3, 1, 5]
    padding_mask = torch.arange(5)[None, :] >= torch.tensor(lengths)[:, None]
    hidden = torch.randn(3, 5, 32)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    padded = head(hidden, padding_mask)
    varlen = head.forward_varlen(hidden[~padding_mask], cu)
    assert padded.shape == (3, 16)
    torch.testing.assert_close(varlen, padded)
    if pooling == "mean":
        expected = head.proj(hidden[0, :3].mean(0))
        torch.testing.assert_close(padded[0], expected)


def test_time_embedding_conditions_encoder():
    time = TimeEmbedding(MODERN.d_model)
    sigma = torch.tensor([0.01, 1.0, 3.0, 6.9])
    condition = time(sigma)
    assert condition.shape == (4, MODERN.d_model)
    encoder = _encoder(MODERN)
    tokens, values, padding_mask = _padded_batch(MODERN, LENGTHS)
    with torch.no_grad():
        a = encoder(tokens, values, padding_mask, condition=condition)
        b = encoder(tokens, values, padding_mask)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- export


def test_hf_export_logits_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cellfoundry.models.hf import bert_config, save_hf_pretrained

    encoder = _encoder(BERT)
    head = BertMLMHead(BERT, encoder.token_embedding).eval()
    with torch.no_grad():
        head.decoder.bias.normal_()
        head.dense.weight.normal_(0, 0.2)
    save_hf_pretrained(encoder, head, tmp_path)
    assert (tmp_path / "config.json").exists()
    assert (tmp_path / "model.safetensors").exists()
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert model.config.to_dict()["hidden_size"] == bert_config(BERT).hidden_size

    tokens, _, padding_mask = _padded_batch(BERT, LENGTHS)
    with torch.no_grad():
        ours = head(encoder(tokens, None, padding_mask))
        theirs = model(input_ids=tokens, attention_mask=(~padding_mask).long()).logits
    real = ~padding_mask
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_hf_export_rejects_incompatible_encoder():
    pytest.importorskip("transformers")
    from cellfoundry.models.hf import bert_config

    with pytest.raises(ValueError, match="BERT-compatible"):
        bert_config(MODERN)


@pytest.mark.slow
def test_encoder_compiles():
    encoder = _encoder(MODERN)
    tokens, values, padding_mask = _padded_batch(MODERN, LENGTHS)
    compiled = torch.compile(encoder)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(tokens, values, padding_mask),
            encoder(tokens, values, padding_mask),
            atol=1e-5,
            rtol=1e-5,
        )
