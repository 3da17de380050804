"""One file per training method; each registers itself (stage.register) as a `minimind train`
command and gives the engine datasets, collation, experience and a loss.

`REGISTRY` maps a stage name to its class once this package is imported; adding a stage is
one file here plus its line below."""

from ..stage import REGISTRY
from . import distill, dpo, grpo, lora, ppo, pretrain, reason, sft, spo  # noqa: F401  (each import registers its stage)

__all__ = ["REGISTRY"]
