"""The one registry: names in configs and on the command line -> classes and functions."""
from __future__ import annotations

import difflib
from typing import Callable

from ..core import processes
from ..errors import ConfigError
from ..sampling.ancestral import sample_ddim, sample_ddpm
from ..sampling.ode import sample_euler, sample_heun
from ..sampling.multistep import nfe_plms, sample_deis, sample_ipndm, sample_plms, sample_unipc

PROCESSES: dict[str, type] = {
    "vp_discrete": processes.VPDiscrete,
    "vp_continuous": processes.VPContinuous,
    "sub_vp": processes.SubVP,
    "ve": processes.VE,
    "edm": processes.EDM,
}

#: name -> (sampler function, NFE of an n-step grid)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], int]]] = {
    "euler": (sample_euler, lambda n: n),
    "heun": (sample_heun, lambda n: 2 * n - 1),
    "ddim": (sample_ddim, lambda n: n),
    "ddpm": (sample_ddpm, lambda n: n),
    "unipc": (sample_unipc, lambda n: n),
    "ipndm": (sample_ipndm, lambda n: n),
    "plms": (sample_plms, nfe_plms),
    "deis": (sample_deis, lambda n: n),
}


def lookup(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown {what} '{name}'{hint}; valid: {', '.join(table)}")
