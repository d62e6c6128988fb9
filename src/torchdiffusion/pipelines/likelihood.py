"""Bits/dim of a set of 8-bit images under a trained denoiser: what the `likelihood` command runs.

Estimators: 'ode', the probability-flow ODE likelihood of uniformly dequantised images (sampling.likelihood,
Song et al. 2021), for any model; 'vlb', the variational bound (core.vlb): the discrete DDPM/iDDPM bound for
vp_discrete models, VDM's continuous bound for vdm models. Both report bits/dim of the 8-bit images in the same
convention (level k <-> k / 127.5 - 1, unit bins). Image i's dequantisation noise and probes come from
(seed, i) only, so a result does not depend on the batch size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..sampling import likelihood as lik


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index` of the evaluated split: depends on (seed, index) only, not on the batch."""
    return torch.Generator().manual_seed((int(seed) << 32) + int(index))


def has_vlb(process) -> bool:
    """Whether the process has a variational bound here (vp_discrete, vdm)."""
    from ..core.processes import VPDiscrete
    from ..core.vdm import VDM
    return isinstance(process, (VPDiscrete, VDM))


@dataclass
class LikelihoodResult:
    bpd: Tensor  # float64 (N,) bits/dim per image
    mean: float
    stderr: float
    seconds: float
    nfe_mean: Optional[float] = None  # ode: mean function evaluations per image


def evaluate_bpd(model, images: Tensor, labels: Optional[Tensor] = None, *, estimator: str = "ode", seed: int = 0,
                 batch: int = 16, device: torch.device | str = "cpu", sigma_min: float, sigma_max: float,
                 hutchinson: int = 1, probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                 method: str = "dopri5", vlb_timesteps: Optional[int] = None,
                 progress: Optional[Callable[[int, int, float], None]] = None) -> LikelihoodResult:
    """images: uint8 (N, C, H, W); labels: (N,) int64 for a class-conditional model (the likelihood of an image
    given its label) or None. hutchinson: probes per image, 0 = the exact divergence. progress(done, total,
    seconds) after every batch."""
    count = len(images)
    values, nfes = [], []
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        idx = list(range(start, min(start + batch, count)))
        x_u8 = images[idx].to(device)
        cond = {"label": labels[idx].to(device)} if labels is not None else None
        if estimator == "ode":
            gens = [image_generator(seed, i) for i in idx]
            x = lik.dequantize(x_u8, gens)
            r = lik.ode_log_likelihood(model, x, sigma_min=sigma_min, sigma_max=sigma_max, cond=cond,
                                       divergence="exact" if hutchinson == 0 else "hutchinson",
                                       probes=max(hutchinson, 1), probe=probe, generator=gens, rtol=rtol, atol=atol,
                                       method=method)
            values.append(lik.bits_per_dim(r.log_p, r.dims).cpu())
            nfes.append(r.nfe.double())
        else:
            from ..core.vlb import vlb_bpd
            options = {} if vlb_timesteps is None else {"timesteps": vlb_timesteps}
            values.append(vlb_bpd(model, x_u8, image_generator(seed, start), cond=cond, **options).double().cpu())
        if progress is not None:
            progress(min(start + batch, count), count, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    bpd = torch.cat(values)
    mean, se = lik.mean_and_stderr(bpd)
    return LikelihoodResult(bpd, mean, se, seconds, float(torch.cat(nfes).mean()) if nfes else None)
