"""Plain `torch.nn.Module` models and objective functions for transcriptomic foundation models.

No Lightning here: the Lightning training systems wrap these modules and functions.
"""

from cellfoundry.models.attention import SelfAttention, attention_backend
from cellfoundry.models.encoder import EncoderConfig, TranscriptomeEncoder
from cellfoundry.models.heads import BertMLMHead, ProjectionHead, TimeEmbedding, ValueHead

__all__ = [
    "BertMLMHead",
    "EncoderConfig",
    "ProjectionHead",
    "SelfAttention",
    "TimeEmbedding",
    "TranscriptomeEncoder",
    "ValueHead",
    "attention_backend",
]
