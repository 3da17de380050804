"""The pipeline's recipe: data size, model size and every stage's training budget.

Owns `Recipe` (each field is a `minimind pipeline` / `minimind demo` flag) and `STAGE_FIELDS`,
which recipe fields each stage reads: a stage is reused from an earlier run only when its own
fields and everything upstream of it are unchanged (minimind.pipeline.runner).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recipe:
    """The demo's data and training budget.

    A 2M-parameter model on 2 cores is limited by optimizer steps, not tokens: for the same
    tokens and time, 8 windows of 128 tokens per step reach a much lower loss than 32 of 256,
    and facts are stored only after several epochs (bench/RESULTS.md, "The demo recipe").
    """

    preset: str = "demo"  # the model (`minimind presets`); bigger ones want a GPU
    size_mb: float = 2.7  # demo pretrain text; the other files scale with it
    vocab_size: int = 2048
    split_digits: bool = True  # numbers encode digit by digit (tokenizer/train.py)
    cjk_chunk: int = 2  # no token spans more Chinese characters (0: off; tokenizer/train.py)
    # chat rows. The calculator conversations need about 460 (the tool prompt in a tokenizer
    # that rarely saw it): they are dropped (the shards line says so) rather than paid for in
    # every DPO replay batch they would pad (+28 s) and in distillation (+13 s)
    seq_len: int = 256
    pretrain_seq_len: int = 128  # packed windows; demo texts are under 512 characters
    pretrain_epochs: int = 3
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    sft_epochs: int = 3
    sft_batch: int = 8
    sft_lr: float = 1e-3
    lora_rank: int = 8
    lora_epochs: int = 6  # the identity needs them; fewer cost more facts (bench/RESULTS.md)
    lora_lr: float = 2e-3
    dpo_epochs: int = 2
    dpo_batch: int = 8
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    # the chosen reply's NLL beside the DPO loss (RPO): without it the SFT model, which never
    # abstained, wins the stranger pairs on log-ratios without ever preferring the abstention
    dpo_rpo_alpha: float = 2.0
    # SFT rows replayed beside the pairs (DPO's --replay_alpha): DPO alone costs the held-out
    # SFT loss +32% and held-out arithmetic 8 points; with the replay +9% and none
    dpo_replay_alpha: float = 3.0
    grpo_steps: int = 128
    grpo_prompts: int = 8  # per step, each sampled grpo_generations times
    grpo_generations: int = 8
    grpo_lr: float = 1e-4
    reason_epochs: int = 2
    reason_lr: float = 5e-4
    # knowledge distillation: a smaller student (hidden, layers, heads) trained from scratch
    # on the SFT file twice, by the labels alone and with the SFT model as its teacher
    student_hidden: int = 128
    student_layers: int = 2
    student_heads: int = 4
    distill_epochs: int = 1
    distill_lr: float = 1e-3
    distill_alpha: float = 0.5  # weight of the label CE; the rest is T^2 * KL to the teacher
    distill_temperature: float = 1.0


# stage -> the recipe fields it reads (its inputs; upstream stages' fields count too)
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "corpus": ("size_mb",),
    "tokenizer": ("vocab_size", "split_digits", "cjk_chunk"),
    "shards": ("seq_len",),
    "pretrain": ("preset", "pretrain_seq_len", "pretrain_epochs", "pretrain_batch", "pretrain_lr"),
    "sft": ("sft_epochs", "sft_batch", "sft_lr"),
    "lora": ("lora_rank", "lora_epochs", "lora_lr"),
    "dpo": ("dpo_epochs", "dpo_batch", "dpo_lr", "dpo_beta", "dpo_rpo_alpha", "dpo_replay_alpha"),
    "grpo": ("grpo_steps", "grpo_prompts", "grpo_generations", "grpo_lr"),
    "reason": ("reason_epochs", "reason_lr"),
    "distill": (
        "student_hidden",
        "student_layers",
        "student_heads",
        "distill_epochs",
        "distill_lr",
        "distill_alpha",
        "distill_temperature",
    ),
    "export": (),
    "chat": (),
}
