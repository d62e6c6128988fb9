"""A run's sample settings with a command's overrides: the one place where --sampler, --steps, --grid,
--grid-file and --eta (or train.eval_sampler / train.eval_steps) replace the values of the `sample` section."""
from __future__ import annotations

import dataclasses
from typing import Collection, Optional

from ..errors import ConfigError


def override_sample(sample, *, sampler: Optional[str] = None, steps: Optional[int] = None,
                    grid: Optional[str] = None, grid_file=None, eta: Optional[float] = None,
                    grids: Optional[Collection[str]] = None, source: str = "sample settings",
                    steps_name: str = "--steps", grid_name: str = "--grid"):
    """`sample` (a SampleConfig) with every override that is not None; the grid must be one of `grids` (the
    registry's grid kinds) when they are given. A ConfigError names the flag (steps_name, grid_name) or, for
    anything else, `source`."""
    changes = {k: v for k, v in (("sampler", sampler), ("steps", steps), ("grid", grid),
                                 ("grid_file", None if grid_file is None else str(grid_file)), ("eta", eta))
               if v is not None}
    try:
        out = dataclasses.replace(sample, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    if out.steps < 1:
        raise ConfigError(f"{steps_name} must be >= 1, got {out.steps}")
    if grids is not None and out.grid not in grids:
        raise ConfigError(f"{grid_name} {out.grid!r} is not valid; valid: {', '.join(grids)}")
    return out
