"""Inference over token ids: batched, streaming generation with the KV cache (no tokenizer)."""

from .generation import Completion, GenerationConfig, Step, generate, stream

__all__ = ["Completion", "GenerationConfig", "Step", "generate", "stream"]
