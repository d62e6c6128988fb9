"""Likelihood in bits per dimension from variational bounds: the discrete VLB of DDPM/iDDPM and the continuous
VLB of VDM.

API (each returns per-image bits/dim as a (B,) float64 tensor; the *_terms variants return a `VLBTerms`):

    discrete_vlb_bpd(model, x, generator=None, *, variance=None, data=None, timesteps=None, batch=None)
    vdm_vlb_bpd(model, x, generator=None, *, data=None, timesteps=1)
    vlb_bpd(model, x, generator=None, **options)      # picks one of the two from the model's process

- model: a denoiser D(x, sigma, cond) -> x0 estimate with `.process` (a `VPDiscrete` for the discrete bound, a
  `vdm.VDM` for the continuous one). The discrete bound asks for (D, v) with `model(x, sigma, cond, return_variance=True)`
  (precond.denoise_with_variance) when the model has a learned variance (`precond.LearnedVariance`, or a guidance
  wrapper around one); the VDM bound uses `model.schedule` (a `vdm.MonotoneGamma`).
- x: (B, ...) images, either uint8 in 0..255 or float in [-1, 1].
- generator: a torch.Generator for the noise and the time draws (the estimate is Monte Carlo in x_t and t).
- data: "8bit" (default for uint8 input) or "continuous" (default for float input).
  * "8bit": level k of a uint8 pixel is the value 2k/255 - 1 (data.convert.to_model_range). The bound is on
    -log2 P(x) of the discrete image (a probability mass), through a discretised decoder: the DDPM decoder of
    Ho et al. 2020 (eq. 13: Gaussian mass of the bin [v - 1/255, v + 1/255], outer bins extended to +-inf) or
    VDM's 256-way decoder (Kingma et al. 2021, Appendix C). No dequantisation noise is added. These numbers are
    what Ho et al., Nichol & Dhariwal and Kingma et al. report, and they compare directly with a PF-ODE
    estimate on uniformly dequantised data (whose bits/dim bound the discrete ones from above).
    Float input must then lie on the 8-bit grid (checked).
  * "continuous": a Gaussian decoder density; the bound is on -log2 p(x) of x in [-1, 1] as a density (so it
    changes by log2(c) per dimension if the data are scaled by c). Used for data that are not quantised.
- bits/dim = nats / (D ln 2), D = the number of elements of one image.

Discrete bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-6), timesteps i = 0 .. T-1 of the model's
`VPDiscrete` table sigma_i (i = 0 the least noisy), all in the frame x = x0 + sigma n (KL divergences are invariant
under the common rescaling x_t = x / sqrt(1 + sigma^2)):
    L_prior = KL(q(x_{T-1} | x0) || N(0, I))                        (no model, VP space)
    L_i     = KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)),  i >= 1   q: mean x0 + (s'^2/s^2)(x - x0), var `small`
                                                                     p: mean D + (s'^2/s^2)(x - D), var Sigma
    L_0     = -log p(x0 | x_0)                                       decoder: mean D, var Sigma_0
Sigma is "small", "large" or "learned" (precond.reverse_step_variances / interpolated_log_variance); for the
decoder "small" is clipped to the posterior variance of step 1, as iDDPM does (the true one is 0).
`timesteps=None` sums all T terms (T denoiser calls per image); `timesteps=K` is an unbiased stratified estimate
(K equal strata of 0 .. T-1, one uniform draw per stratum and image, weighted by the stratum size).

Continuous bound (VDM eqs. 11-17): vdm.prior_kl + vdm.reconstruction_nll + the diffusion integral, estimated with
`timesteps` low-discrepancy times per image (vdm.low_discrepancy_t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError, TorchDiffusionError
from ..protocols import Cond
from . import vdm
from .precond import denoise_with_variance, interpolated_log_variance, provides_variance, reverse_step_variances
from .processes import VPDiscrete

VARIANCES = ("small", "large", "learned")
DATA = ("8bit", "continuous")
_BIN = 1.0 / 255  # half-width of an 8-bit bin in [-1, 1]


@dataclass(frozen=True)
class VLBTerms:
    """Per-image terms of a variational bound, each (B,) float64 in bits/dim; total = prior + diffusion + decoder."""

    prior: Tensor
    diffusion: Tensor
    decoder: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.diffusion + self.decoder


# ------------------------------------------------------------------------------------------------ data
def prepare(x: Tensor, data: str | None) -> tuple[Tensor, str]:
    """(x0 as float32 in [-1, 1], data kind); see the module notes for the conventions."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise DataError("x must be a (B, ...) tensor of images (uint8 in 0..255 or float in [-1, 1])")
    if x.dtype == torch.uint8:
        data = data or "8bit"
        x0 = x.to(torch.float32) / 127.5 - 1.0
    elif x.is_floating_point():
        data = data or "continuous"
        x0 = x.to(torch.float32)
    else:
        raise DataError(f"x must be uint8 (0..255) or float ([-1, 1]), got {x.dtype}")
    if data not in DATA:
        raise DataError(f"data must be one of {', '.join(DATA)}, got {data!r}")
    if not torch.isfinite(x0).all():
        raise DataError("x holds non-finite values")
    if data == "8bit" and x.dtype != torch.uint8:
        k = (x0.double() + 1) * 127.5
        if (k - k.round()).abs().max() > 1e-3 or k.min() < -1e-3 or k.max() > 255 + 1e-3:
            raise DataError("data='8bit' needs x on the 8-bit grid k/127.5 - 1 (k = 0..255); pass uint8 images, or "
                            "data='continuous' for a density of non-quantised data")
        x0 = (k.round() / 127.5 - 1).to(torch.float32)
    return x0, data


def _bpd(nats: Tensor, x0: Tensor) -> Tensor:
    return nats / (x0[0].numel() * math.log(2))


# ------------------------------------------------------------------------------------------------ Gaussians
def normal_kl(mean_q: Tensor, var_q, mean_p: Tensor, log_var_p: Tensor) -> Tensor:
    """Elementwise KL(N(mean_q, var_q) || N(mean_p, exp(log_var_p))) in nats (var_q > 0), float64."""
    var_q = torch.as_tensor(var_q, dtype=torch.float64, device=mean_q.device)
    log_var_p = log_var_p.double()
    d = (mean_q.double() - mean_p.double()) ** 2
    return 0.5 * (log_var_p - torch.log(var_q) + (var_q + d) * torch.exp(-log_var_p) - 1)


def _log_sub_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) - exp(b)) for a >= b, accurate when b is close to a."""
    d = (b - a).clamp(max=0)
    return a + torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def discretized_gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise log P(bin of x0) under N(mean, exp(log_var)) with 8-bit bins [x0 - 1/255, x0 + 1/255] and the
    outer bins extended to -inf / +inf (Ho et al. 2020, eq. 13). x0 on the 8-bit grid in [-1, 1]; float64."""
    x, m = x0.double(), mean.double()
    inv_std = torch.exp(-0.5 * log_var.double())
    hi, lo = (x - m + _BIN) * inv_std, (x - m - _BIN) * inv_std
    # Phi(hi) - Phi(lo), with the symmetric form Phi(-lo) - Phi(-hi) on the right tail to avoid cancellation
    right = lo > 0
    a = torch.where(right, -lo, hi)
    b = torch.where(right, -hi, lo)
    log_mass = _log_sub_exp(torch.special.log_ndtr(a), torch.special.log_ndtr(b))
    log_mass = torch.where(x < -1 + 1e-6, torch.special.log_ndtr(hi), log_mass)  # (-inf, -1 + 1/255]
    log_mass = torch.where(x > 1 - 1e-6, torch.special.log_ndtr(-lo), log_mass)  # [1 - 1/255, inf)
    return log_mass.clamp(min=-1e4)


def gaussian_log_density(x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise log N(x0; mean, exp(log_var)), float64."""
    lv = log_var.double()
    return -0.5 * ((x0.double() - mean.double()) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi))


# ------------------------------------------------------------------------------------------------ one reverse step
def step_log_variance(variance: str, s: Tensor, s_next: Tensor, s_clip_small: Tensor, v: Tensor | None) -> Tensor:
    """log Sigma of the reverse step from s to s' (rows of (B,) tensors), broadcast to v's shape when learned.

    Rows with s' = 0 are decoder steps: "small" would be 0 there and is replaced by s_clip_small (the posterior
    variance of the step above, iDDPM's clipped log variance); "large" is beta = s^2 / (1 + s^2)."""
    small, large = reverse_step_variances(s.double(), s_next.double())
    small = torch.where(s_next > 0, small, s_clip_small.double())
    log_small, log_large = torch.log(small), torch.log(large)
    if variance == "small":
        return log_small
    if variance == "large":
        return log_large
    if v is None:
        raise TorchDiffusionError("variance 'learned' needs the model's variance output v")
    return interpolated_log_variance(v.double(), log_small, log_large)


def reverse_step_nll(x0: Tensor, x: Tensor, denoised: Tensor, log_var: Tensor, s: Tensor, s_next: Tensor,
                     data: str) -> Tensor:
    """Per-row nats of one term of the discrete bound, summed over each row, (B,) float64:
    rows with s' > 0: KL(q(x_{s'} | x_s, x0) || N(D + (s'^2/s^2)(x - D), Sigma)); rows with s' = 0: the decoder
    -log p(x0 | x_s) with mean D and variance Sigma (discretised for "8bit", a density for "continuous").
    s, s_next: (B,); log_var: (B,) or x's shape."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    s_, sn_ = s.double().reshape(shape), s_next.double().reshape(shape)
    lv = log_var.double()
    if lv.ndim == 1:
        lv = lv.reshape(shape).expand(x0.shape)
    ratio = sn_**2 / s_**2
    D, x0d, xd = denoised.double(), x0.double(), x.double()
    is_step = s_next > 0
    small, _ = reverse_step_variances(s_, sn_)
    kl = normal_kl(x0d + ratio * (xd - x0d), small.clamp(min=1e-300), D + ratio * (xd - D), lv)
    if data == "8bit":
        dec = -discretized_gaussian_log_likelihood(x0d, D, lv)
    else:
        dec = -gaussian_log_density(x0d, D, lv)
    out = torch.where(is_step.reshape(shape), kl, dec)
    return out.flatten(1).sum(1)


def _denoise(model, x: Tensor, sigma: Tensor, cond: Cond, variance: str) -> tuple[Tensor, Tensor | None]:
    if variance == "learned":
        return denoise_with_variance(model, x, sigma, cond)
    return model(x, sigma, cond), None


# ------------------------------------------------------------------------------------------------ discrete bound
def vp_prior_kl(x0: Tensor, sigma_T: float) -> Tensor:
    """KL(q(x_T | x0) || N(0, I)), q = N(sqrt(abar) x0, (1 - abar) I), abar = 1 / (1 + sigma_T^2); (B,) nats."""
    abar = 1.0 / (1.0 + sigma_T**2)
    x = x0.double().flatten(1)
    return 0.5 * (abar * x**2 + (1 - abar) - math.log(1 - abar) - 1).sum(1)


@torch.no_grad()
def discrete_vlb_terms(model, x: Tensor, generator: torch.Generator | None = None, *, variance: str | None = None,
                       data: str | None = None, timesteps: int | None = None, cond: Cond = None,
                       process: VPDiscrete | None = None) -> VLBTerms:
    """The discrete bound's terms per image, in bits/dim (see the module notes)."""
    process = process if process is not None else getattr(model, "process", None)
    if not isinstance(process, VPDiscrete):
        raise TorchDiffusionError("the discrete VLB needs a discrete-time VP model (model.process.kind vp_discrete)")
    if variance is None:
        variance = "learned" if provides_variance(model) else "small"
    if variance not in VARIANCES:
        raise TorchDiffusionError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if variance == "learned" and not provides_variance(model):
        raise TorchDiffusionError("variance 'learned' needs a model with a learned variance (model.variance learned)")
    x0, data = prepare(x, data)
    dev = x0.device
    B, T = x0.shape[0], process.T
    table = process.sigmas().to(dev)  # (T,) float64
    below = torch.cat([table.new_zeros(1), table[:-1]])  # s' of step i: sigma_{i-1}, 0 for the decoder
    clip = reverse_step_variances(table[1], table[0])[0]  # posterior variance of step 1 (iDDPM's clipping)
    if timesteps is None:
        strata = [(i, i + 1) for i in range(T)]
    else:
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or not 1 <= timesteps <= T:
            raise TorchDiffusionError(f"timesteps must be an integer in [1, {T}] (or None for all), got {timesteps!r}")
        edges = torch.linspace(0, T, timesteps + 1).round().long().tolist()
        strata = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    total = torch.zeros(B, dtype=torch.float64, device=dev)
    decoder = torch.zeros(B, dtype=torch.float64, device=dev)
    for a, b in strata:
        if b - a == 1:
            i = torch.full((B,), a, dtype=torch.long)
        else:
            i = torch.randint(a, b, (B,), generator=generator)
        i = i.to(dev)
        s, sn = table[i], below[i]
        n = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev)
        xt = x0 + s.float().reshape((-1,) + (1,) * (x0.ndim - 1)) * n
        D, v = _denoise(model, xt, s.float(), cond, variance)
        lv = step_log_variance(variance, s, sn, clip.expand(B), v)
        nats = reverse_step_nll(x0, xt, D, lv, s, sn, data) * (b - a)
        total += nats
        decoder += torch.where(i == 0, nats, torch.zeros_like(nats))
    prior = vp_prior_kl(x0, float(table[-1]))
    return VLBTerms(_bpd(prior, x0), _bpd(total - decoder, x0), _bpd(decoder, x0))


def discrete_vlb_bpd(model, x: Tensor, generator: torch.Generator | None = None, **options) -> Tensor:
    """Per-image bits/dim of the discrete bound (B,) float64; options as `discrete_vlb_terms`."""
    return discrete_vlb_terms(model, x, generator, **options).total


# ------------------------------------------------------------------------------------------------ VDM bound
@torch.no_grad()
def vdm_vlb_terms(model, x: Tensor, generator: torch.Generator | None = None, *, data: str | None = None,
                  timesteps: int = 1, cond: Cond = None, schedule=None) -> VLBTerms:
    """VDM's continuous bound per image, in bits/dim: prior + reconstruction + diffusion, the diffusion integral
    estimated with `timesteps` low-discrepancy times per image. schedule: default model.schedule."""
    schedule = schedule if schedule is not None else getattr(model, "schedule", None)
    if schedule is None:
        raise TorchDiffusionError("the VDM bound needs a VDM model (model.process.kind vdm) or a schedule")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise TorchDiffusionError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    x0, data = prepare(x, data)
    dev = x0.device
    B = x0.shape[0]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    g0, g1 = schedule.gamma_min, schedule.gamma_max
    prior = vdm.prior_kl(x0, g1)
    n0 = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev)
    recon = vdm.reconstruction_nll(x0, x0 + math.exp(0.5 * g0) * n0, g0, data)
    diff = torch.zeros(B, dtype=torch.float64, device=dev)
    t_all = torch.stack([vdm.low_discrepancy_t(B, generator) for _ in range(timesteps)])  # (K, B)
    for k in range(timesteps):
        gamma, dgamma = schedule.with_derivative(t_all[k])
        sigma = torch.exp(0.5 * gamma).to(dev)
        n = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev)
        xt = x0 + sigma.float().reshape(shape) * n
        D = model(xt, sigma.float(), cond)
        sq = (D.double() - x0.double()).pow(2).flatten(1).sum(1)
        diff += vdm.diffusion_loss(sq, gamma.to(dev), dgamma.to(dev))
    return VLBTerms(_bpd(prior, x0), _bpd(diff / timesteps, x0), _bpd(recon, x0))


def vdm_vlb_bpd(model, x: Tensor, generator: torch.Generator | None = None, **options) -> Tensor:
    """Per-image bits/dim of VDM's continuous bound (B,) float64; options as `vdm_vlb_terms`."""
    return vdm_vlb_terms(model, x, generator, **options).total


def vlb_bpd(model, x: Tensor, generator: torch.Generator | None = None, **options) -> Tensor:
    """The variational bound that fits the model's process: discrete (VPDiscrete) or continuous (VDM)."""
    process = getattr(model, "process", None)
    if isinstance(process, vdm.VDM):
        return vdm_vlb_bpd(model, x, generator, **options)
    if isinstance(process, VPDiscrete):
        return discrete_vlb_bpd(model, x, generator, **options)
    raise TorchDiffusionError(f"no variational bound for process {type(process).__name__}; the VLB needs a "
                              f"vp_discrete or vdm model (use the probability-flow ODE likelihood for the others)")
