"""Sampler options from the command line (`sample --sampler-opt KEY=VALUE`) and NFE counting.

A sampler's options are its keyword-only parameters with defaults, minus the calling convention's own
(cond, generator, callback) and Python-only hooks (correct, noise_sampler, stats). Values are converted to the type of
the default (bool, int, float, str); inf and nan parse as floats and the sampler checks their ranges.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

from torch import Tensor

from ..errors import ConfigError
from ..protocols import Cond

#: keyword parameters that are not user options
RESERVED = frozenset({"cond", "generator", "callback", "correct", "noise_sampler", "stats"})
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def sampler_options(fn: Callable) -> dict[str, Any]:
    """name -> default of every user option of sampler `fn` (a function or a functools.partial)."""
    bound = fn.keywords if isinstance(fn, functools.partial) else {}
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.name not in RESERVED and p.default is not p.empty:
            out[p.name] = bound.get(p.name, p.default)
    return out


def _convert(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError("expected an integer") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    return value


def _describe(options: dict[str, Any]) -> str:
    def show(v):
        return "inf" if isinstance(v, float) and math.isinf(v) else repr(v) if isinstance(v, str) else str(v)
    return ", ".join(f"{k} (default {show(v)})" for k, v in options.items())


def parse_sampler_options(name: str, fn: Callable, pairs: Sequence[str]) -> dict[str, Any]:
    """['S_churn=40', 'S_noise=1.003'] -> {'S_churn': 40.0, 'S_noise': 1.003} for sampler `name`, or a one-line
    ConfigError naming the sampler's valid options."""
    valid = sampler_options(fn)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--sampler-opt {pair!r} is not KEY=VALUE; options of sampler '{name}': "
                              f"{_describe(valid) or 'none'}")
        if key not in valid:
            if not valid:
                raise ConfigError(f"--sampler-opt {key}: sampler '{name}' takes no options")
            raise ConfigError(f"--sampler-opt {key}: no such option of sampler '{name}'; valid: {_describe(valid)}")
        try:
            out[key] = _convert(value.strip(), valid[key])
        except ValueError as e:
            raise ConfigError(f"--sampler-opt {key}={value!r}: {e}; options of sampler '{name}': "
                              f"{_describe(valid)}") from None
    return out


def build_run_sampler(scfg, pairs: Sequence[str] = ()) -> tuple[Callable, dict[str, Any], Any]:
    """(sampler, its parsed options, NFE per image or None where only a count can tell) of a sample config (the
    `sample` command's overrides applied, pipelines.settings.override_sample) and KEY=VALUE option strings: what
    `sample` and the library's pipeline (config.pipeline) sample with."""
    from .build import build_sampler
    from .registry import SAMPLERS

    fn = build_sampler(scfg)
    options = parse_sampler_options(scfg.sampler, fn, pairs)
    if options:
        fn = functools.partial(fn, **options)
    return fn, options, SAMPLERS[scfg.sampler][1](scfg.steps)


class CountingDenoiser:
    """Wraps a denoiser and counts evaluations per batch row: `nfe_per_row` = rows evaluated / rows sampled.
    For samplers whose NFE is not known in advance (dpm_adaptive)."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser
        self.rows = 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        self.rows += int(x.shape[0])
        return self.denoiser(x, sigma, cond)
