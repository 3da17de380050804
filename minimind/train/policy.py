"""Sampling from the model being trained (the live policy), for rollouts in RL stages.

Owns `Policy.generate`: the engine's trained model, unwrapped from DDP and torch.compile,
switched to eval mode (dropout off) for the rollout and back to train mode after, decoding
through minimind.infer.generation under the training autocast.

The trained parameters are never rebound: generation runs with `fuse=False`, so the KV-cache
path does not turn the q/k/v and gate/up weights into views of a new buffer (which the
optimizer, DDP's buckets and FSDP's shards would no longer see as the same storage).

FSDP2 shards every parameter across ranks; decoding needs whole weights on each rank, and a
rollout is many tiny forwards outside the root module's `forward` (the static decode step),
so under FSDP the policy gathers a full copy (one all-gather per rollout, then plain decoding
on the copy). Models here are at most ~150M parameters, so the copy is small next to the
optimizer state. When the trained module wraps the policy (`.lm`, beside PPO's value head or
critic), only the policy's weights are gathered.

torch.compile (`--compile`) wraps the module for the engine's loss forward only; the policy
holds the plain module whose parameters the compiled one shares, so sampling runs eagerly on
the live weights and never triggers a recompilation of the training graph.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from minimind.infer.generation import Completion, GenerationConfig, generate

from .stage import eval_mode


class Policy:
    """A handle on the trained model for sampling. `model` is the plain (unwrapped) module the
    optimizer updates, or a module that wraps the language model as `.lm` (PPO's policy with
    its value head); `fsdp` says whether its parameters are FSDP2 shards."""

    def __init__(
        self,
        model: nn.Module,
        autocast: Callable[[], contextlib.AbstractContextManager],
        fsdp: bool = False,
    ):
        self.model = getattr(model, "lm", model)
        self.autocast, self.fsdp = autocast, fsdp
        self._replica: nn.Module | None = None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's current weights, whole: its own state dict (the live tensors), or
        under FSDP2 gathered from the shards (a collective: every rank must call it)."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))

    def _gathered(self) -> nn.Module:
        """Under FSDP2, a plain replica holding the full current weights (every rank)."""
        full = self.full_state_dict()
        if self._replica is None:
            from minimind.model import MiniMindForCausalLM

            self._replica = MiniMindForCausalLM(copy.deepcopy(self.model.config))
            self._replica.to(next(iter(full.values())).device)
        self._replica.load_state_dict(full, strict=False)
        return self._replica.eval()

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        **overrides,
    ) -> list[Completion]:
        """`minimind.infer.generation.generate` on the live weights (fuse forced off)."""
        overrides["fuse"] = False
        model = self._gathered() if self.fsdp else self.model  # the replica is in eval mode
        with eval_mode(self.model), self.autocast():
            return generate(model, [list(p) for p in prompts], config, **overrides)
