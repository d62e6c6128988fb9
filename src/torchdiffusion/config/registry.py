"""The one registry: names in configs and on the command line -> classes and functions."""
from __future__ import annotations

import difflib
from typing import Callable, Optional

from ..core import processes, vdm
from ..errors import ConfigError
from ..sampling.ancestral import sample_ddim, sample_ddpm
from ..sampling.ode import sample_euler, sample_heun
from ..sampling.multistep import nfe_plms, sample_deis, sample_ipndm, sample_plms, sample_unipc
from ..sampling import dpm_solver, kdiff
from ..sampling.adaptive import sample_pf_ode
from ..sampling.sde import pc_nfe, sample_pc, sample_pc_em

PROCESSES: dict[str, type] = {
    "vp_discrete": processes.VPDiscrete,
    "vp_continuous": processes.VPContinuous,
    "sub_vp": processes.SubVP,
    "ve": processes.VE,
    "edm": processes.EDM,
    "vdm": vdm.VDM,
}

#: name -> (sampler function, NFE of an n-step grid ending in 0; None where the sampler chooses its own steps)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], Optional[int]]]] = {
    "euler": (sample_euler, lambda n: n),
    "heun": (sample_heun, lambda n: 2 * n - 1),
    "ddim": (sample_ddim, lambda n: n),
    "ddpm": (sample_ddpm, lambda n: n),
    "unipc": (sample_unipc, lambda n: n),
    "ipndm": (sample_ipndm, lambda n: n),
    "plms": (sample_plms, nfe_plms),
    "deis": (sample_deis, lambda n: n),
    # the k-diffusion family (sampling.kdiff, sampling.dpm_solver; docs/samplers.md)
    "euler_ancestral": (kdiff.sample_euler_ancestral, lambda n: n),
    "dpm2": (kdiff.sample_dpm2, lambda n: 2 * n - 1),
    "dpm2_ancestral": (kdiff.sample_dpm2_ancestral, lambda n: 2 * n - 1),
    "lms": (kdiff.sample_lms, lambda n: n),
    "dpm_fast": (dpm_solver.sample_dpm_fast, lambda n: n),
    "dpm_adaptive": (dpm_solver.sample_dpm_adaptive, lambda n: None),  # step-size controlled: measured, not known
    "dpmpp_2s_ancestral": (kdiff.sample_dpmpp_2s_ancestral, lambda n: 2 * n - 1),
    "dpmpp_2m": (kdiff.sample_dpmpp_2m, lambda n: n),
    "dpmpp_2m_sde": (kdiff.sample_dpmpp_2m_sde, lambda n: n),
    "dpmpp_3m_sde": (kdiff.sample_dpmpp_3m_sde, lambda n: n),
    "edm": (kdiff.sample_edm, lambda n: 2 * n - 1),
    # Score SDE (sampling.sde, sampling.adaptive; docs/score_sde.md)
    "pc": (sample_pc, pc_nfe),  # reverse-diffusion predictor + Langevin corrector: n + n_corrector (n - 1)
    "pc_em": (sample_pc_em, pc_nfe),  # Euler-Maruyama predictor + Langevin corrector
    "pf_ode": (sample_pf_ode, lambda n: None),  # adaptive Dormand-Prince on the probability-flow ODE: measured
}


#: inverse-problem solvers: name -> (restore function, NFE of an n-step grid given the method's options). The
#: correction methods (inverse.methods.SAMPLER_METHODS) take `sampler=` (a SAMPLERS function) and `sampler_options`;
#: their NFE below is DDPM's (n), the sampler's own NFE formula applies otherwise (inverse_nfe).
def _inverse_methods() -> dict[str, tuple[Callable, Callable[..., int]]]:
    from ..inverse import methods as inv

    def plain(n: int, **options) -> int:
        return n

    return {
        "replacement": (inv.restore_replacement, plain),
        "ilvr": (inv.restore_ilvr, plain),
        "ccdf": (inv.restore_ccdf, plain),
        "mcg": (inv.restore_mcg, plain),
        "dps": (inv.restore_dps, plain),
        "repaint": (inv.restore_repaint, lambda n, jump=10, resample=10, **o: inv.repaint_nfe(n, jump, resample)),
        "reconstruction": (inv.restore_reconstruction, plain),
    }


INVERSE_METHODS = _inverse_methods()
#: other accepted names of inverse methods: alias -> name in INVERSE_METHODS
INVERSE_ALIASES = {"pocs": "replacement"}


def inverse_method(name: str) -> tuple[str, Callable, Callable[..., int]]:
    """(canonical name, restore function, NFE formula) of an inverse method name or alias (pocs = replacement),
    or a one-line ConfigError naming the valid ones."""
    canonical = INVERSE_ALIASES.get(name, name)
    if canonical not in INVERSE_METHODS:
        names = list(INVERSE_METHODS) + [f"{a} (= {b})" for a, b in INVERSE_ALIASES.items()]
        close = difflib.get_close_matches(name, list(INVERSE_METHODS) + list(INVERSE_ALIASES), n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown restore method '{name}'{hint}; valid: {', '.join(names)}")
    fn, nfe = INVERSE_METHODS[canonical]
    return canonical, fn, nfe

def lookup(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown {what} '{name}'{hint}; valid: {', '.join(table)}")
