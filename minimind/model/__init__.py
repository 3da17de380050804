"""The MiniMind model: architecture only, importing nothing but torch."""

from .cache import KVCache
from .config import MINIMIND2_YARN, PRESETS, ModelConfig, preset
from .transformer import CausalLMOutput, MiniMindForCausalLM

__all__ = [
    "MINIMIND2_YARN",
    "PRESETS",
    "CausalLMOutput",
    "KVCache",
    "MiniMindForCausalLM",
    "ModelConfig",
    "preset",
]
