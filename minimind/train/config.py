"""TrainConfig: the training loop's settings (not the model's: that is ModelConfig).

Field names follow MiniMind's command-line flags where one exists, so `--batch_size 32` maps
to `batch_size`, and a checkpoint's meta.json records them verbatim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"  # run folder: step_XXXXXXXX checkpoints, metrics.jsonl
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs)
    batch_size: int = 32  # micro-batch per process
    accumulation_steps: int = 1
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of learning_rate
    warmup_ratio: float = 0.0  # fraction of all training samples spent warming up linearly
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    dtype: str = "bf16"  # autocast precision; master weights stay fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard with FSDP2 under torchrun instead of DDP
    eval_interval: int = 0  # optimizer steps between evaluations (0: only at the end)
    eval_batches: int = 20
    save_interval: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3  # step checkpoints kept on disk
    log_interval: int = 10
    seed: int = 42
    resume: bool = False
    num_workers: int = 0  # DataLoader worker processes
    tracker: str | None = None  # None | "wandb" | "swanlab"
    tracker_project: str = "MiniMind"
    tensorboard: bool = False
    peak_tflops: float | None = None  # device peak for the MFU estimate (None: known GPUs only)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        errors = []
        for name in ("epochs", "batch_size", "accumulation_steps", "log_interval", "keep_last"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.learning_rate > 0:
            errors.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tracker not in (None, "wandb", "swanlab"):
            errors.append(f"tracker must be wandb or swanlab, got {self.tracker!r}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
