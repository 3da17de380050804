"""LoRA adapters (Hu et al. 2021): explicit module swap, merge, adapter-only state dict.

Owns `LoRALinear`, its config (`LoRAConfig`, and the config's JSON form), swapping adapters into
a model (`apply_lora`) and folding them back out (`merge_lora`), and the adapter-only state dict
with its strict load. It does not own files (an adapter folder, `adapter_config.json` from
`lora_config_dict` plus `adapter.safetensors` from `lora_state_dict`, is written above the model
package, which imports only torch), the optimizer or the training loop (train/stages/lora.py).

Design decisions:
- An explicit module swap, not a monkey-patched forward (MiniMind2's way): the adapter is a
  visible submodule, `print(model)` shows it, and `named_parameters()` names it.
- forward has no Python-side state (no "merged" flag, no branches on settings), so
  torch.compile traces it without graph breaks or recompiles. Merging builds a new nn.Linear
  instead of flipping a flag.
- Every adapter parameter takes part in every forward (MoE experts run even on zero tokens),
  so DDP needs no `find_unused_parameters`; frozen parameters (requires_grad False) are left
  out of DDP's gradient buckets altogether.
- Order of wrapping: apply_lora (or load an adapter) first, then torch.compile, DDP or FSDP.
  Pass the bare model (not DDP's `.module` holder or compile's `_orig_mod` holder) to the
  functions here, so adapter keys never carry a wrapper's prefix.

Keys: an adapted `model.layers.0.self_attn.q_proj` holds `...q_proj.base.weight` (frozen) and
`...q_proj.lora_A` (r, in) / `...q_proj.lora_B` (out, r); after `merge_lora` the model's
state_dict keys are the base model's again.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Written into adapter_config.json so a reader can tell an adapter folder from a checkpoint.
LORA_FORMAT = "minimind-lora"
LORA_FORMAT_VERSION = 1

# Every attention and MLP projection (also inside MoE experts); the router `mlp.gate` is not
# an nn.Linear and is never adapted, nor is the (tied) head.
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass
class LoRAConfig:
    """Rank r, scaling alpha / r, dropout on the adapter input, and which Linears to adapt.

    target_modules match a module's last name component ("q_proj") or any dotted suffix of its
    full name ("self_attn.q_proj", "layers.0.mlp.down_proj").
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.target_modules, str):
            errors.append(
                f"target_modules must be a list of names, got the string {self.target_modules!r}"
            )
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                errors.append("target_modules is empty")
            bad = [
                t
                for t in self.target_modules
                if not isinstance(t, str) or not t or t.startswith(".") or t.endswith(".")
            ]
            if bad:
                errors.append(f"target_modules entries must be module names, got {bad}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            errors.append(f"r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            errors.append(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if errors:
            raise ValueError("invalid LoRAConfig: " + "; ".join(errors))


def lora_config_dict(config: LoRAConfig) -> dict[str, Any]:
    """The JSON form of a LoRAConfig (adapter_config.json), with the format marker.

    >>> lora_config_dict(LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    {'format': 'minimind-lora', 'format_version': 1, 'r': 4, 'alpha': 16.0, 'dropout': 0.0, 'target_modules': ['q_proj', 'v_proj']}
    """
    data = asdict(config)
    data["target_modules"] = list(config.target_modules)
    return {"format": LORA_FORMAT, "format_version": LORA_FORMAT_VERSION, **data}


def lora_config_from_dict(data: dict[str, Any]) -> LoRAConfig:
    """Inverse of lora_config_dict; a wrong format marker or an unknown field is an error.

    >>> lora_config_from_dict(lora_config_dict(LoRAConfig(r=4))).r
    4
    """
    data = dict(data)
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != LORA_FORMAT or version != LORA_FORMAT_VERSION:
        raise ValueError(
            f"not a LoRA adapter config: format={fmt!r} version={version!r}, expected "
            f"{LORA_FORMAT!r} version {LORA_FORMAT_VERSION}"
        )
    unknown = sorted(set(data) - {f.name for f in fields(LoRAConfig)})
    if unknown:
        raise ValueError(f"unknown LoRAConfig fields: {', '.join(unknown)}")
    return LoRAConfig(**data)


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) A^T B^T * alpha / r  (Hu et al. 2021, eq. 3).

    base: the wrapped nn.Linear, frozen; lora_A (r, in), lora_B (out, r), in the base's dtype
    and on its device. A is kaiming-uniform and B zero (sec. 4.1), so a fresh adapter changes
    nothing: the wrapped model starts exactly at the base model.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = alpha / r  # a plain float: compiled in as a constant
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **like))
        # Dropout acts on the adapter's input only; the base path is never dropped.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # a=sqrt(5) is nn.Linear's own default init, as in the paper's loralib.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out); the adapter goes through rank r: (..., r) in between."""
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + delta * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight W + B A * scaling (and the base's bias).

        The sum is taken in at least float32 and rounded once to the base's dtype. This module is
        left unchanged (its adapter can still be saved); the merged Linear gets a new weight,
        with the base weight's requires_grad, and shares the base's bias.
        """
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        delta = (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling  # (out, in)
        # Built on "meta" (no allocation, no throw-away init), then given the real weight.
        merged = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter((w.to(acc) + delta).to(w.dtype), requires_grad=w.requires_grad)
        merged.bias = self.base.bias
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block the model computes as its base: every adapter's scaling is 0, so each
    adapted Linear returns base(x) + 0 x delta = base(x) exactly (DPO's reference without a
    second copy of the model). Not for a compiled model: scaling is compiled in as a constant."""
    adapters = list(lora_modules(model).values())
    saved = [m.scaling for m in adapters]
    for m in adapters:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, scaling in zip(adapters, saved, strict=True):
            m.scaling = scaling


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[str]:
    """Swap the targeted nn.Linears for LoRALinears in place; freeze everything else.

    Returns the adapted module names. Every parameter that is not an adapter gets
    requires_grad False (the embedding and tied head included). Errors: the model already has
    adapters; a target name matches no nn.Linear (the message lists the available names); a
    target Linear shares its weight with another module (a tied head: merging would untie it).
    """
    if config is None:
        config = LoRAConfig()
    present = lora_modules(model)
    if present:
        raise ValueError(
            f"model already has {len(present)} LoRA adapters (e.g. {next(iter(present))}); "
            "apply_lora twice would stack adapters: merge_lora(model) first, or load weights "
            "into the existing ones with load_lora_state_dict"
        )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [t for t in config.target_modules if not any(_matches(name, t) for name in linears)]
    if unmatched:
        available = sorted({name.rpartition(".")[2] for name in linears})
        example = next(iter(linears), "")
        raise ValueError(
            f"LoRA target_modules {unmatched} match no nn.Linear in {type(model).__name__}; "
            f"available: {', '.join(available)} (or a dotted suffix of a full name, e.g. "
            f"{example!r})"
        )
    targets = [n for n in linears if any(_matches(n, t) for t in config.target_modules)]
    # A parameter reachable under two names is tied (lm_head.weight is embed_tokens.weight).
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    tied = [n for n in targets if len(owners[id(linears[n].weight)]) > 1]
    if tied:
        raise ValueError(
            f"LoRA targets {tied} share their weight with {owners[id(linears[tied[0]].weight)]} "
            "(tied embeddings): merging would untie them; leave them out of target_modules"
        )
    model.requires_grad_(False)
    for name in targets:
        _replace(model, name, LoRALinear(linears[name], config.r, config.alpha, config.dropout))
    return targets


def merge_lora(model: nn.Module) -> list[str]:
    """Swap every LoRALinear back for its merged nn.Linear, in place; returns their names.

    Afterwards the state_dict keys are the base model's, so checkpoint and export code see a
    plain model. requires_grad is left as it is (frozen). A model without adapters is left
    unchanged ([]). Save the adapter first if it is still wanted: it is gone from the model.
    """
    merged = lora_modules(model)
    for name, module in merged.items():
        _replace(model, name, module.merge())
    return list(merged)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All adapter parameters (lora_A, lora_B of each LoRALinear): the optimizer's params."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter-only state dict: `{module}.lora_A` (r, in) and `{module}.lora_B` (out, r).

    Tensors are detached and share storage with the parameters, like nn.Module.state_dict.
    """
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A"] = m.lora_A.detach()
        sd[f"{name}.lora_B"] = m.lora_B.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter-only state dict into a model that apply_lora has already adapted.

    Strict: every missing, unexpected or mis-shaped key is named, and nothing is copied unless
    all match. Values are cast to each parameter's dtype and device.
    """
    own = lora_state_dict(model)
    if not own:
        raise ValueError(
            "model has no LoRA adapters: apply_lora(model, config) first, with the adapter's "
            "saved config"
        )
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: adapter {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    if problems:
        raise ValueError("LoRA state dict does not fit the model; " + "; ".join(problems))
    for k, v in own.items():
        v.copy_(state_dict[k])
