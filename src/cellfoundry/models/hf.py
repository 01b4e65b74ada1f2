"""Export a BERT-compatible encoder + MLM head as a Hugging Face ``BertForMaskedLM``.

Geneformer users continue in the Hugging Face ecosystem (fine-tuning, ``geneformer`` tooling).
An encoder is exportable when ``config.is_bert_compatible``: post-LN, learned positions, a
token-type embedding, no value embedding, no gene-embedding adapter. The parameter mapping is
one-to-one except for the fused qkv projection, which is split into query, key and value.

The exported vocabulary is ours (``<cls>`` 0, ``<pad>`` 1, ``<mask>`` 2, ``<eos>`` 3 for
Geneformer V2 inputs, then genes), not Geneformer's token dictionary; ship the token mapping
CSV with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cellfoundry.models.encoder import ACTIVATIONS, EncoderConfig, TranscriptomeEncoder
from cellfoundry.models.heads import BertMLMHead

if TYPE_CHECKING:
    from transformers import BertConfig, BertForMaskedLM

__all__ = ["bert_config", "bert_state_dict", "save_hf_pretrained", "to_bert_for_masked_lm"]


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "exporting to Hugging Face needs `transformers` (pip install 'cellfoundry[hf]')"
        ) from error


def bert_config(config: EncoderConfig) -> BertConfig:
    """The ``transformers.BertConfig`` describing the same architecture as `config`."""
    require_transformers()
    from transformers import BertConfig

    if not config.is_bert_compatible:
        raise ValueError(
            "encoder is not BERT-compatible: needs norm_first=False, position='learned', "
            "type_vocab_size >= 1, n_values=0 and no gene embeddings"
        )
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff,
        hidden_act=ACTIVATIONS[config.activation],
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_len,
        type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        position_embedding_type="absolute",
        tie_word_embeddings=True,
    )


def bert_state_dict(encoder: TranscriptomeEncoder, head: BertMLMHead) -> dict[str, Tensor]:
    """Our weights under ``BertForMaskedLM`` parameter names (detached fp32 copies)."""
    return {k: v.detach().float().cpu().clone() for k, v in _bert_views(encoder, head).items()}


def load_bert_state_dict(
    encoder: TranscriptomeEncoder, head: BertMLMHead, state: dict[str, Tensor]
) -> None:
    """Fill our modules from ``BertForMaskedLM`` weights (the inverse of `bert_state_dict`)."""
    views = _bert_views(encoder, head)
    missing = sorted(
        set(views) - set(state) - {"cls.predictions.decoder.bias", "cls.predictions.decoder.weight"}
    )
    if missing:
        raise KeyError(f"BERT weights lack {missing[:5]}")
    with torch.no_grad():
        for name, view in views.items():
            if name in state:
                view.copy_(state[name].to(view.dtype))


def _bert_views(encoder: TranscriptomeEncoder, head: BertMLMHead) -> dict[str, Tensor]:
    """Our parameters (or slices of them) under BERT's names; writing a view writes ours."""
    d = encoder.config.d_model
    emb = encoder.embeddings
    out: dict[str, Tensor] = {
        "bert.embeddings.word_embeddings.weight": emb.token_embedding.weight,
        "bert.embeddings.position_embeddings.weight": emb.position_embedding.weight,
        "bert.embeddings.token_type_embeddings.weight": emb.token_type_embedding.weight,
        "bert.embeddings.LayerNorm.weight": emb.norm.weight,
        "bert.embeddings.LayerNorm.bias": emb.norm.bias,
    }
    for i, layer in enumerate(encoder.layers):
        p = f"bert.encoder.layer.{i}."
        qkv_w = layer.attention.qkv.weight
        qkv_b = layer.attention.qkv.bias
        for j, name in enumerate(("query", "key", "value")):
            out[f"{p}attention.self.{name}.weight"] = qkv_w[j * d : (j + 1) * d]
            out[f"{p}attention.self.{name}.bias"] = qkv_b[j * d : (j + 1) * d]
        out[f"{p}attention.output.dense.weight"] = layer.attention.out.weight
        out[f"{p}attention.output.dense.bias"] = layer.attention.out.bias
        out[f"{p}attention.output.LayerNorm.weight"] = layer.attention_norm.weight
        out[f"{p}attention.output.LayerNorm.bias"] = layer.attention_norm.bias
        out[f"{p}intermediate.dense.weight"] = layer.ffn.fc1.weight
        out[f"{p}intermediate.dense.bias"] = layer.ffn.fc1.bias
        out[f"{p}output.dense.weight"] = layer.ffn.fc2.weight
        out[f"{p}output.dense.bias"] = layer.ffn.fc2.bias
        out[f"{p}output.LayerNorm.weight"] = layer.ffn_norm.weight
        out[f"{p}output.LayerNorm.bias"] = layer.ffn_norm.bias
    out.update(
        {
            "cls.predictions.transform.dense.weight": head.dense.weight,
            "cls.predictions.transform.dense.bias": head.dense.bias,
            "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
            "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
            "cls.predictions.decoder.weight": head.decoder.weight,
            "cls.predictions.bias": head.decoder.bias,
            "cls.predictions.decoder.bias": head.decoder.bias,
        }
    )
    return out


def to_bert_for_masked_lm(encoder: TranscriptomeEncoder, head: BertMLMHead) -> BertForMaskedLM:
    """A ``transformers.BertForMaskedLM`` computing the same function as ``head(encoder(...))``.

    The head's decoder must be tied to the encoder's token embedding (BERT ties them); the
    returned model is in eval mode, in fp32, on CPU.
    """
    if head.decoder.weight is not encoder.token_embedding.weight and not torch.equal(
        head.decoder.weight, encoder.token_embedding.weight
    ):
        raise ValueError("BERT ties the MLM decoder to the token embedding; this head is untied")
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(bert_config(encoder.config))
    expected = set(model.state_dict())
    weights = bert_state_dict(encoder, head)
    missing = expected - set(weights)
    # position_ids / token_type_ids are constant buffers HF builds itself.
    missing = {k for k in missing if not k.endswith(("position_ids", "token_type_ids"))}
    if missing:
        raise RuntimeError(f"no weights for BertForMaskedLM parameters {sorted(missing)}")
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    return model.eval()


def save_hf_pretrained(
    encoder: TranscriptomeEncoder, head: BertMLMHead, out_dir: str | Path
) -> Path:
    """Write ``config.json`` + ``model.safetensors``, loadable with
    ``transformers.BertForMaskedLM.from_pretrained(out_dir)``.

    Returns
    -------
    The output directory.
    """
    out_dir = Path(out_dir)
    model = to_bert_for_masked_lm(encoder, head)
    model.save_pretrained(out_dir)
    return out_dir
