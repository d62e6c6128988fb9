"""Preconditioners and the `Preconditioned` denoiser module.

Notation (Karras et al. 2022, eq. 7): D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
where F is the backbone and x = x0 + sigma n is in the one frame. Each output head is one choice of
(c_skip, c_out, c_in); the noise label c_noise comes from the noise process the model was trained with.

| head | c_skip            | c_out                      | c_in                 | F predicts |
|------|-------------------|----------------------------|----------------------|------------|
| eps  | 1                 | -sigma                     | s(sigma)             | n (Ho et al. 2020) |
| x0   | 0                 | 1                          | s(sigma)             | x0 |
| v    | sd^2/(sigma^2+sd^2) | -sigma sd/sqrt(sigma^2+sd^2) | 1/sqrt(sigma^2+sd^2) | v = alpha n - sigma_t x0 (Salimans & Ho 2022) |
| edm  | sd^2/(sigma^2+sd^2) | sigma sd/sqrt(sigma^2+sd^2)  | 1/sqrt(sigma^2+sd^2) | EDM's scaled target (Karras et al. 2022, eq. 7) |

With s(sigma) = 1/sqrt(1 + sigma^2) for VP processes (so c_in x = x_t) and 1 for VE/EDM. For sd = 1 the v head's
c_in equals the VP scale, which is why v-prediction and EDM differ only in the sign of F.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..protocols import Cond
from .processes import NoiseProcess

HEADS = ("eps", "x0", "v", "edm")

#: `train.precision: auto`: bf16 autocast where the device runs bf16 maths natively, else fp32 (resolved per call)
AUTO = "auto"


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix maths is native: a CUDA device that supports it, or an x86 CPU with AVX512-BF16 or
    AMX. Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates bf16, which measured ~10x slower than fp32 for the mnist
    preset's U-Net on a 2-core AVX2 CPU (6 vs 60 img/s), so `auto` keeps fp32 there."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_autocast(dtype, device: torch.device):
    """The autocast dtype to use on `device`: `dtype` itself, or for AUTO bf16 where native_bf16 else None."""
    if dtype == AUTO:
        return torch.bfloat16 if native_bf16(device) else None
    return dtype


def describe_precision(precision: str, device: torch.device) -> str | None:
    """A log line for train.precision on `device` (auto's choice; bf16 where it is emulated), or None."""
    if precision == AUTO:
        if native_bf16(device):
            return "precision auto: bf16 autocast (native bf16 on this device)"
        return "precision auto: fp32 (no native bf16 on this device: AVX512-BF16 or AMX on a CPU)"
    if precision == "bf16" and not native_bf16(device):
        return ("warning: train.precision=bf16 on a device without native bf16 (a CPU without AVX512-BF16 or AMX) "
                "is emulated and can be many times slower than fp32; train.precision=auto picks fp32 here")
    return None


@dataclass(frozen=True)
class Preconditioner:
    """sigma -> (c_skip, c_out, c_in, c_noise), all float32 of sigma's shape."""

    head: str = "eps"
    sigma_data: float = 0.5  # Karras et al. 2022; used by the v and edm heads

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown output head {self.head!r}; valid: {', '.join(HEADS)}")

    def coefficients(self, sigma: Tensor, process: NoiseProcess) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = sigma.double()
        sd = self.sigma_data
        if self.head == "eps":
            c_skip, c_out, c_in = torch.ones_like(s), -s, process.scale(s)
        elif self.head == "x0":
            c_skip, c_out, c_in = torch.zeros_like(s), torch.ones_like(s), process.scale(s)
        else:
            norm = (s**2 + sd**2).sqrt()
            c_skip, c_in = sd**2 / norm**2, 1 / norm
            c_out = (s * sd / norm) * (-1.0 if self.head == "v" else 1.0)
        c_noise = process.c_noise(s)
        return tuple(c.to(torch.float32) for c in (c_skip, c_out, c_in, c_noise))


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank (DESIGN style 6: broadcast by rank)."""
    return c.reshape(c.shape + (1,) * (x.ndim - 1))


class Preconditioned(nn.Module):
    """The module that implements the Denoiser contract for a backbone F(x, c_noise, cond).

    The one place that casts dtypes: inputs and outputs are float32, autocast (if any) wraps only the backbone.
    """

    def __init__(self, backbone: nn.Module, process: NoiseProcess, precond: Preconditioner,
                 autocast_dtype: torch.dtype | str | None = None):
        super().__init__()
        self.backbone = backbone
        self.process = process
        self.precond = precond
        self.autocast_dtype = autocast_dtype

    def raw(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (F, c_skip, c_out) with F the backbone output in float32; c_* broadcast to x."""
        x = x.float()
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma, self.process)
        c_skip, c_out, c_in = (_bcast(c.to(x.device), x) for c in (c_skip, c_out, c_in))
        dtype = resolve_autocast(self.autocast_dtype, x.device)  # AUTO: bf16 where native (native_bf16)
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            F = self.backbone(c_in * x, c_noise.to(x.device), cond)
        return F.float(), c_skip, c_out

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        """x: (B, ...) in the frame; sigma: (B,) or scalar; returns the (B, ...) float32 estimate of E[x0 | x]."""
        F, c_skip, c_out = self.raw(x, sigma, cond)
        return c_skip * x.float() + c_out * F


# ------------------------------------------------------------------------------------------------ learned variance
def reverse_step_variances(s, s_next):
    """Frame variances (small, large) of the reverse step from sigma s to s' < s (floats or tensors).

    small = s'^2 (s^2 - s'^2) / s^2                 (beta-tilde_t / abar_{t-1}: the posterior variance)
    large = (s^2 - s'^2) (1 + s'^2) / (1 + s^2)     (beta_t / abar_{t-1})
    with beta_t = 1 - abar_t / abar_{t-1} and abar = 1 / (1 + sigma^2) (Ho et al. 2020, eqs. 6-7). Read off two
    sigmas, these are the respaced betas of Nichol & Dhariwal 2021 (Appendix B) on any grid.
    """
    d = s * s - s_next * s_next
    return s_next * s_next * d / (s * s), d * (1 + s_next * s_next) / (1 + s * s)


def interpolated_log_variance(v: Tensor, log_small, log_large) -> Tensor:
    """log Sigma = v log(large) + (1 - v) log(small) (Nichol & Dhariwal 2021, eq. 15); v is not clamped (the
    paper's network may extrapolate); log_small/log_large broadcast to v by rank from (B,) or are scalars."""
    if isinstance(log_small, Tensor) and log_small.ndim == 1 and v.ndim > 1:
        log_small, log_large = _bcast(log_small, v), _bcast(log_large, v)
    return v * log_large + (1 - v) * log_small


def provides_variance(denoiser) -> bool:
    """Whether `denoiser` answers `denoiser(x, sigma, cond, return_variance=True)` with (D, v): a LearnedVariance
    model, or a wrapper (CFG, classifier guidance) around one; they say so with `learned_variance = True`."""
    return bool(getattr(denoiser, "learned_variance", False))


def denoise_with_variance(denoiser, x: Tensor, sigma: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor]:
    """(D, v) from a denoiser with a learned variance, through the denoiser contract's one optional keyword
    `return_variance=True` (no side channel); a one-line ConfigError for a denoiser that gives no variance."""
    if not provides_variance(denoiser):
        raise ConfigError(f"a learned variance is needed (DDPM variance 'learned', the variational bound), but the "
                          f"denoiser {type(denoiser).__name__} gives none: it must be a learned-variance model "
                          f"(model.variance learned) or a guidance wrapper around one (cfg, classifier); "
                          f"use variance 'small' or 'large' otherwise")
    out = denoiser(x, sigma, cond, return_variance=True)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ConfigError(f"the denoiser {type(denoiser).__name__} says it has a learned variance but did not return "
                          f"(D, v) for return_variance=True")
    return out


class LearnedVariance(Preconditioned):
    """A Preconditioned denoiser whose backbone outputs 2C channels: C for the configured head, C for the
    variance interpolation v of iDDPM (Nichol & Dhariwal 2021, sec. 3.1).

    The denoiser contract is unchanged: `forward(x, sigma, cond)` returns the (B, C, ...) x0 estimate from the first
    C channels; `forward(x, sigma, cond, return_variance=True)` returns (D, v) with v = (r + 1) / 2 from the
    backbone's raw variance channels r (as the paper's reference code maps its [-1, 1] output), so v = 0.5 at
    initialisation (zero output conv). Wrappers that keep the contract (guidance.cfg, guidance.classifier) forward
    the keyword. The reverse step from sigma s to s' then has frame variance exp(v log(large) + (1 - v) log(small))
    with (small, large) = reverse_step_variances(s, s'). v is per element and independent of the step, so the
    same network output serves any respaced grid.
    """

    learned_variance = True

    def raw_with_variance(self, x: Tensor, sigma: Tensor, cond: Cond = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(F, v, c_skip, c_out): F the head's C output channels, v the variance interpolation, both float32."""
        out, c_skip, c_out = super().raw(x, sigma, cond)
        c = x.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"a learned-variance backbone must output 2 x {c} channels for a {c}-channel input, "
                             f"got {out.shape[1]}")
        return out[:, :c], (out[:, c:] + 1) * 0.5, c_skip, c_out

    def raw(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor, Tensor]:
        F, _, c_skip, c_out = self.raw_with_variance(x, sigma, cond)
        return F, c_skip, c_out

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None, return_variance: bool = False):
        """The x0 estimate (B, C, ...) float32, or (D, v) with return_variance=True."""
        F, v, c_skip, c_out = self.raw_with_variance(x, sigma, cond)
        denoised = c_skip * x.float() + c_out * F
        return (denoised, v) if return_variance else denoised

    def denoise_with_variance(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor]:
        """(x0 estimate, v), both (B, C, ...) float32: `self(x, sigma, cond, return_variance=True)`."""
        return self(x, sigma, cond, return_variance=True)
