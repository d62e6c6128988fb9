"""A run's sample settings with a command's overrides: the one place where --sampler, --steps, --grid,
--grid-file and --eta (or train.eval_sampler / train.eval_steps) replace the values of the `sample` section; and
the integer-list syntax of --seeds and --labels ('0-63', '0,5,9'), shared by the commands and the library."""
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


def int_ranges(text: str) -> list[int]:
    """'0-63', '3', '0,5,9', '0-4,9': ranges and single integers separated by commas, in order; ValueError on
    anything else (a descending range included). Empty parts are ignored, so the result may be empty."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (int(v) for v in part.split("-", 1))
            if b < a:
                raise ValueError(part)
            out.extend(range(a, b + 1))
        elif part:
            out.append(int(part))
    return out


def parse_int_list(text: str, name: str) -> list[int]:
    """int_ranges(text), or a one-line ConfigError naming `name` (e.g. 'seeds') and the syntax."""
    try:
        return int_ranges(text)
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not valid; use a range like 0-9, a list like 0,5,9, or both") from None
