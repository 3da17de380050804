"""Mixture-of-experts feed-forward: softmax top-k router, routed and shared SwiGLU experts.

Routing follows MiniMind2 (and Mixtral when there are no shared experts): softmax over the
routed experts in float32, keep the top k, renormalise their weights over the chosen k, add the
shared experts unweighted. The load-balancing loss is Switch-Transformer style (Fedus et al.
2021, eq. 4), at sequence level (MiniMind2's `seq_aux`) or batch level.

Dispatch is grouped by expert: token-expert assignments are sorted by expert, each expert runs
once on its contiguous slice, and results are scattered back with index_add. The only Python
loop is over experts, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import SwiGLU


class MoEGate(nn.Module):
    """Router: weight (E, C); returns top-k expert ids and weights, and the balance loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> ids (B*T, k) long, weights (B*T, k) float32, aux loss (scalar)."""
        b, t, c = x.shape
        scores = F.linear(x.reshape(-1, c), self.weight).float().softmax(-1)  # (N, E)
        weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        if self.training and self.alpha > 0:
            e, k = self.n_experts, self.top_k
            if self.seq_aux:
                # f_i per sequence: fraction of that sequence's assignments routed to expert i,
                # scaled so that a uniform router gives 1; P_i: mean router probability.
                counts = scores.new_zeros(b, e).scatter_add_(
                    1, ids.view(b, t * k), scores.new_ones(b, t * k)
                )
                f = counts / (t * k / e)
                aux = (f * scores.view(b, t, e).mean(1)).sum(1).mean() * self.alpha
            else:
                f = F.one_hot(ids.reshape(-1), e).float().mean(0) * e
                aux = (f * scores.mean(0)).sum() * self.alpha
        return ids, weights, aux


class MoEFeedForward(nn.Module):
    """Routed experts weighted by the router, plus shared experts on every token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.moe_intermediate_size
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, width, config.dropout)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = nn.ModuleList(
            SwiGLU(config.hidden_size, width, config.dropout)
            for _ in range(config.n_shared_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> y (B, T, C), aux loss."""
        b, t, c = x.shape
        ids, weights, aux = self.gate(x)
        flat = x.reshape(-1, c)  # (N, C)
        k = ids.shape[1]
        assign = ids.reshape(-1)  # (N*k,) expert of each token-expert assignment
        order = assign.argsort(stable=True)
        token = order // k  # source token of each sorted assignment
        counts = torch.bincount(assign, minlength=len(self.experts)).tolist()
        # Every expert runs, even on zero rows, so all parameters join the graph (DDP-safe).
        outs = [
            expert(chunk)
            for expert, chunk in zip(self.experts, flat[token].split(counts), strict=True)
        ]
        routed = torch.cat(outs) * weights.reshape(-1)[order, None].to(outs[0].dtype)
        y = torch.zeros(flat.shape[0], c, dtype=routed.dtype, device=x.device)
        y = y.index_add_(0, token, routed).view(b, t, c).to(x.dtype)
        for shared in self.shared_experts:
            y = y + shared(x)
        return y, aux
