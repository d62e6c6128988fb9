"""The conditioner interface and the collection a run uses.

A conditioner is named by its entry in the run config (`cond: {NAME: {kind: ..., ...}}`). It fills one or more
keys of the `cond` mapping the denoiser receives (most fill one key, NAME; a super-resolution conditioner fills
the concatenated low-resolution image and its augmentation level). It

- declares what the backbone must embed (`specs`: one CondSpec per key it fills), so a backbone builds its
  embeddings from the declared conditions instead of knowing the condition kinds;
- makes its tensors from a training batch (`from_batch(batch, step) -> {key: tensor}`, with its own dropout to
  its null value for classifier-free guidance; step None = validation, no dropout);
- makes its tensors from user input at sampling time (`for_sampling(seeds, values) -> {key: tensor}`);
- says what its null is (`null(cond) -> {key: tensor}` for its own keys), which classifier-free guidance uses
  for the unconditional branch.

The CondSpec kinds a backbone may receive (later kinds use the same six):
  class    (B,) int64 in [0, size]; size = number of classes, `size` itself is the null label
  scalar   (B,) float (e.g. a noise-augmentation level), embedded like the noise level
  vector   (B, size) float (e.g. augmentation parameters), embedded by a linear map
  concat   (B, size, *S) float, concatenated to x along channels (e.g. an up-sampled low-resolution image)
  context  (B, M, size) float, attended to by cross-attention (e.g. text tokens)
  frames   (B, T) per-frame values of a clip (frame indices, the independent-image mask), for video backbones
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import CondSpec

class Conditioner(Protocol):
    name: str

    @property
    def specs(self) -> tuple[CondSpec, ...]: ...

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> dict[str, Tensor]: ...

    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> dict[str, Tensor]: ...

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


class Conditioning:
    """The conditioners of one run, in config order: the trainer's make_cond hook, the sampling cond, the null
    condition of classifier-free guidance. An empty Conditioning is the unconditional model (cond = None)."""

    def __init__(self, conditioners: Sequence[Conditioner] = (), device: torch.device | str = "cpu"):
        self.items = {c.name: c for c in conditioners}
        keys = [s.key for c in conditioners for s in c.specs]
        if len(self.items) != len(conditioners) or len(set(keys)) != len(keys):
            raise ConfigError(f"two conditioners write the same cond key (keys: {', '.join(keys)})")
        self.device = torch.device(device)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def __getitem__(self, name: str) -> Conditioner:
        return self.items[name]

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return tuple(s for c in self.items.values() for s in c.specs)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.specs)

    def _to(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in cond.items()}

    def __call__(self, batch: Mapping[str, Tensor], step: Optional[int] = None) -> Optional[dict[str, Tensor]]:
        """make_cond(batch, step) for the trainer: every conditioner's tensors from the batch (with dropout when
        step is a training step, none when step is None)."""
        if not self.items:
            return None
        return self._to({k: v for c in self.items.values() for k, v in c.from_batch(batch, step).items()})

    def for_sampling(self, seeds: Sequence[int], values: Optional[Mapping[str, Any]] = None
                     ) -> Optional[dict[str, Tensor]]:
        """The cond of the given seeds from user input (values[conditioner name], e.g. {"label": [3, 4]}); a
        conditioner without a value uses its own default for the seeds (e.g. labels seed % K)."""
        if not self.items:
            if values:
                raise ConfigError(f"this model takes no conditions, got {', '.join(sorted(values))}")
            return None
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.items))
        if unknown:
            raise ConfigError(f"unknown condition(s) {', '.join(unknown)}; this model takes: "
                              f"{', '.join(self.items)}")
        return self._to({k: v for name, c in self.items.items()
                         for k, v in c.for_sampling(seeds, values.get(name)).items()})

    @property
    def augments(self) -> bool:
        """True when a conditioner augments the training images (the augment kind)."""
        return any(hasattr(c, "augment_batch") for c in self.items.values())

    def augment(self, x0: Tensor, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, dict]:
        """The diffusion step's augmentation hook: every augmenting conditioner's augment_batch(x0, batch, step) in
        config order (x0 augmented, the batch with their parameters for from_batch)."""
        batch = dict(batch)
        for c in self.items.values():
            if hasattr(c, "augment_batch"):
                x0, batch = c.augment_batch(x0, batch, step)
        return x0, batch

    def cond_for(self, seeds: Sequence[int]) -> Optional[dict[str, Tensor]]:
        """The default sampling cond of training grids and evaluation (no user input)."""
        return self.for_sampling(seeds) if self.items else None

    def null(self, cond: Optional[Mapping[str, Tensor]]) -> Optional[dict[str, Tensor]]:
        """The null condition of the same batch: every conditioner's keys replaced by its null (the
        unconditional branch of classifier-free guidance); keys no conditioner owns are kept."""
        if not self.items:
            raise ConfigError("classifier-free guidance needs a conditional model; this one takes no conditions")
        if cond is None or not set(self.keys) <= set(cond):
            raise ConfigError(f"classifier-free guidance needs cond[{', '.join(repr(k) for k in self.keys)}], "
                              f"got {'nothing' if cond is None else sorted(cond)}")
        out = dict(cond)
        for c in self.items.values():
            out.update(c.null(cond))
        return out
