"""The conditioner interface and the collection a run uses.

A conditioner is named by its entry in the run config (`cond: {NAME: {kind: ..., ...}}`); NAME is the key it
fills in the `cond` mapping the denoiser receives. It

- declares what the backbone must embed (`spec`: a CondSpec), so a backbone builds its embeddings from the
  declared conditions instead of knowing the condition kinds;
- makes its tensor from a training batch (`from_batch(batch, step)`, with its own dropout to its null value for
  classifier-free guidance; step None = validation, no dropout);
- makes its tensor from user input at sampling time (`for_sampling(seeds, values)`);
- says what its null is (`null(value)`), which classifier-free guidance uses for the unconditional branch.

The CondSpec kinds a backbone may receive (later kinds use the same five):
  class    (B,) int64 in [0, size]; size = number of classes, `size` itself is the null label
  scalar   (B,) float (e.g. a noise-augmentation level), embedded like the noise level
  vector   (B, size) float (e.g. augmentation parameters), embedded by a linear map
  concat   (B, size, *S) float, concatenated to x along channels (e.g. an up-sampled low-resolution image)
  context  (B, M, size) float, attended to by cross-attention (e.g. text tokens)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import CondSpec

class Conditioner(Protocol):
    key: str

    @property
    def spec(self) -> CondSpec: ...

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> Tensor: ...

    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> Tensor: ...

    def null(self, value: Tensor) -> Tensor: ...


class Conditioning:
    """The conditioners of one run, in config order: the trainer's make_cond hook, the sampling cond, the null
    condition of classifier-free guidance. An empty Conditioning is the unconditional model (cond = None)."""

    def __init__(self, conditioners: Sequence[Conditioner] = (), device: torch.device | str = "cpu"):
        self.items = {c.key: c for c in conditioners}
        if len(self.items) != len(conditioners):
            raise ConfigError("two conditioners write the same cond key")
        self.device = torch.device(device)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __getitem__(self, key: str) -> Conditioner:
        return self.items[key]

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return tuple(c.spec for c in self.items.values())

    def __call__(self, batch: Mapping[str, Tensor], step: Optional[int] = None) -> Optional[dict[str, Tensor]]:
        """make_cond(batch, step) for the trainer: every conditioner's tensor from the batch (with dropout when
        step is a training step, none when step is None)."""
        if not self.items:
            return None
        return {k: c.from_batch(batch, step).to(self.device) for k, c in self.items.items()}

    def for_sampling(self, seeds: Sequence[int], values: Optional[Mapping[str, Any]] = None
                     ) -> Optional[dict[str, Tensor]]:
        """The cond of the given seeds from user input (values[key], e.g. labels); a conditioner without a value
        uses its own default for the seeds (e.g. labels seed % K)."""
        if not self.items:
            if values:
                raise ConfigError(f"this model takes no conditions, got {', '.join(sorted(values))}")
            return None
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.items))
        if unknown:
            raise ConfigError(f"unknown condition(s) {', '.join(unknown)}; this model takes: "
                              f"{', '.join(self.items)}")
        return {k: c.for_sampling(seeds, values.get(k)).to(self.device) for k, c in self.items.items()}

    def cond_for(self, seeds: Sequence[int]) -> Optional[dict[str, Tensor]]:
        """The default sampling cond of training grids and evaluation (no user input)."""
        return self.for_sampling(seeds) if self.items else None

    def null(self, cond: Optional[Mapping[str, Tensor]]) -> Optional[dict[str, Tensor]]:
        """The null condition of the same batch: every conditioner's value replaced by its null (the
        unconditional branch of classifier-free guidance)."""
        if not self.items:
            raise ConfigError("classifier-free guidance needs a conditional model; this one takes no conditions")
        if cond is None or not set(self.items) <= set(cond):
            raise ConfigError(f"classifier-free guidance needs cond[{', '.join(repr(k) for k in self.items)}], "
                              f"got {'nothing' if cond is None else sorted(cond)}")
        return {**cond, **{k: c.null(cond[k]) for k, c in self.items.items()}}
