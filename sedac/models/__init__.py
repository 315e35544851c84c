"""Compact model code: decoder-only transformers that run layer by layer over a paged KV cache."""

from sedac.models.attention import AttentionContext, PrefillChunk, get_context, set_context
from sedac.models.decoder import DecoderModel

__all__ = ["AttentionContext", "PrefillChunk", "DecoderModel", "get_context", "set_context"]
