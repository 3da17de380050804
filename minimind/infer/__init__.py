"""Inference: generation over token ids (generation.py, sampling.py: batched, streaming, KV
cache, no tokenizer), model + tokenizer loading for every file kind (load.py), and chat over
text: prompts, reasoning and tool-call parsing, multi-turn sessions (chat.py)."""

from .generation import Completion, GenerationConfig, Step, generate, stream

__all__ = ["Completion", "GenerationConfig", "Step", "generate", "stream"]
