"""ModelConfig: every architectural hyper-parameter of a MiniMind model, and the named presets.

Owns validation of field combinations (so a bad config fails at construction, not deep inside a
forward pass) and the parameter-count arithmetic. It does not own training settings (learning
rate, batch size): those belong to the training engine's own config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# YaRN as MiniMind2 ships it (docs/FORMATS.md): used at inference only, switched on explicitly.
MINIMIND2_YARN: dict[str, Any] = {
    "type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}


def minimind_intermediate_size(hidden_size: int) -> int:
    """MiniMind2's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64.

    >>> minimind_intermediate_size(512), minimind_intermediate_size(640), minimind_intermediate_size(768)
    (1408, 1728, 2048)
    """
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


@dataclass
class ModelConfig:
    # Dense trunk (MiniMind2 names and defaults; the defaults are MiniMind2-Small).
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int | None = None  # None -> minimind_intermediate_size(hidden_size)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    vocab_size: int = 6400
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # RMSNorm on each query/key head before rotary (Qwen3 / minimind-3 style).
    qk_norm: bool = False
    # YaRN frequency scaling (None = plain RoPE). See MINIMIND2_YARN.
    rope_scaling: dict[str, Any] | None = None
    # Mixture of experts (MiniMind2-MoE).
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True  # sequence-level balance loss (MiniMind2); False -> batch-level
    moe_intermediate_size: int | None = None  # None -> intermediate_size
    # Initialisation: normal(0, initializer_range); residual projections scaled by 1/sqrt(2L).
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, carried in config.json

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = minimind_intermediate_size(self.hidden_size)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        errors = []
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads > 0 and self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                errors.append(
                    f"num_attention_heads={self.num_attention_heads} does not divide "
                    f"hidden_size={self.hidden_size}"
                )
            else:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim is not None and self.head_dim % 2:
            errors.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % max(
            self.num_key_value_heads, 1
        ):
            errors.append(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.use_moe:
            if self.n_routed_experts <= 0:
                errors.append(f"n_routed_experts must be positive, got {self.n_routed_experts}")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                errors.append(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"[1, n_routed_experts={self.n_routed_experts}]"
                )
            if self.n_shared_experts < 0:
                errors.append(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.rope_scaling is not None:
            scaling = {**MINIMIND2_YARN, **self.rope_scaling}
            if scaling.get("type", scaling.get("rope_type")) != "yarn":
                errors.append(f"rope_scaling: only type 'yarn' is supported, got {scaling}")
            elif scaling["factor"] < 1.0:
                errors.append(f"rope_scaling.factor must be >= 1, got {scaling['factor']}")
            self.rope_scaling = scaling
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    # --- arithmetic ----------------------------------------------------------------------
    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (tied head counted once); active=True counts only top-k experts.

        >>> ModelConfig().num_parameters()
        25829888
        """
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        attn += 2 * hd if self.qk_norm else 0
        if self.use_moe:
            n_exp = self.num_experts_per_tok if active else self.n_routed_experts
            mlp = 3 * h * self.moe_intermediate_size * (n_exp + self.n_shared_experts)
            mlp += self.n_routed_experts * h  # router
        else:
            mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h


PRESETS: dict[str, dict[str, Any]] = {
    # The three public MiniMind2 models (docs/FORMATS.md); parameter counts are tested.
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8),
    "minimind2": dict(hidden_size=768, num_hidden_layers=16),
    "minimind2-moe": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
    # Unit tests: builds and runs a forward pass in milliseconds.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
    # The offline CPU demo: about 2M parameters. Its tokenizer is trained on the demo corpus
    # with 2048 ids, which keeps the head (a third of the FLOPs at 6400) cheap on 2 cores.
    "demo": dict(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=2048,
        max_position_embeddings=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden.

    >>> round(preset("minimind2-moe").num_parameters() / 1e6, 2)
    145.03
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def main(argv: list[str] | None = None) -> int:
    """`minimind presets`: list the named presets with their sizes."""
    import argparse

    argparse.ArgumentParser(prog="minimind presets", description=main.__doc__).parse_args(argv)
    print(f"{'preset':<16} {'hidden':>6} {'layers':>6} {'heads':>6} {'params':>10}")
    for name in PRESETS:
        c = preset(name)
        moe = f"  moe {c.n_routed_experts}+{c.n_shared_experts} top-{c.num_experts_per_tok}"
        print(
            f"{name:<16} {c.hidden_size:>6} {c.num_hidden_layers:>6} "
            f"{c.num_attention_heads}/{c.num_key_value_heads:<4} "
            f"{c.num_parameters() / 1e6:>9.2f}M" + (moe if c.use_moe else "")
        )
    return 0
