"""Where training figures go: the console, a metrics JSONL file, and opt-in trackers.

Owns: `Tracker` (rank 0 only): a rich progress bar on a terminal (plain lines otherwise),
`metrics.jsonl` always, wandb or SwanLab when asked (their run id is kept in checkpoints so a
resumed run continues the same tracking run; offline modes via WANDB_MODE=offline or
SWANLAB_MODE=local), TensorBoard when asked. Also the MFU estimate.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

# A caller that shows its own progress (the pipeline's one display for a whole run) sets this
# to a function (step, total_steps, metrics) -> None: every logged step then goes to it, and no
# progress bar of the Tracker's own competes with it for the terminal.
step_listener: ContextVar[Callable[[int, int, dict[str, float]], None] | None] = ContextVar(
    "step_listener", default=None
)

# Dense bf16 peak TFLOP/s of GPUs we know (datasheets); other devices need --peak_tflops.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "4090": 165.0,
    "3090": 71.0,
}


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding matmul parameters + head) plus attention
    scores and values, 12 x layers x heads x head_dim x seq_len (Chinchilla appendix F; PaLM
    appendix B). MoE counts only the active experts."""
    c = config
    head = c.vocab_size * c.hidden_size
    dense = c.num_parameters(active=True) - head * (1 if c.tie_word_embeddings else 2)
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
    return 6.0 * (dense + head) + attn


def device_peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class Tracker:
    """Rank 0's sink for step metrics; a no-op on other ranks."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        enabled: bool,
        *,
        tracker: str | None = None,
        project: str = "MiniMind",
        run_id: str | None = None,
        tensorboard: bool = False,
        total_steps: int = 0,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.run_id = run_id
        self._backend = None
        self._tb = None
        self._progress = None
        self._listener = None
        self._t_start = time.perf_counter()
        self._start_step = start_step
        self.total_steps = total_steps
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tracker == "wandb":
            self._backend = self._start_wandb(project, run_dir, config, run_id)
        elif tracker == "swanlab":
            self._backend = self._start_swanlab(project, run_dir, config, run_id)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._listener = step_listener.get()
        if self._listener is None and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._progress.start()

    def _start_wandb(self, project, run_dir, config, run_id):
        try:
            import wandb
        except ImportError:
            raise SystemExit("--use_wandb needs the wandb package: pip install wandb") from None
        run = wandb.init(
            project=project,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = run.id
        return run

    def _start_swanlab(self, project, run_dir, config, run_id):
        try:
            import swanlab
        except ImportError:
            raise SystemExit(
                "swanlab tracking needs the swanlab package: pip install swanlab"
            ) from None
        run = swanlab.init(
            project=project,
            logdir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = getattr(run, "id", None) or getattr(
            getattr(run, "public", None), "run_id", None
        )
        return run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._backend is not None:
            self._backend.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        info = " ".join(_shown(k, v) for k, v in metrics.items() if k in _SHOWN)
        if self._listener is not None:
            self._listener(step, self.total_steps, metrics)
        elif self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif "loss" in metrics or "eval_loss" in metrics:
            print(f"step {step}/{self.total_steps} {info} eta={self.eta(step)}", flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (called every step; `log` only every
        log_interval)."""
        if self.enabled and self._progress is not None:
            self._progress.update(self._task, completed=step)

    def eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self._t_start) / done * (self.total_steps - step)
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._backend is not None:
            self._backend.finish()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


_SHOWN = ("loss", "lr", "samples", "tokens_per_s", "mfu", "eval_loss")


def _shown(key: str, value: float) -> str:
    """`key=value` for the console; counts as whole numbers.

    >>> _shown("samples", 16384.0), _shown("lr", 0.000123456)
    ('samples=16384', 'lr=0.0001235')
    """
    return f"{key}={int(value)}" if key == "samples" else f"{key}={value:.4g}"
