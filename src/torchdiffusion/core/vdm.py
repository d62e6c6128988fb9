"""Variational diffusion models (Kingma et al. 2021, "VDM"): a learned monotone log-SNR schedule and the pieces
of the continuous-time variational bound.

Notation: VDM's latent is z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 =
sigmoid(gamma(t)), so SNR(t) = exp(-gamma(t)). In the one frame x = x0 + sigma n (x = z_t / alpha_t) this is

    sigma(t) = exp(gamma(t) / 2),   log-SNR = -gamma = -2 log sigma,   scale s = alpha = 1 / sqrt(1 + sigma^2).

- `VDM` is the frozen process: the fixed end points gamma_min = gamma(0), gamma_max = gamma(1), the backbone's
  noise label, and a reference time t_ref(sigma) = (2 log sigma - gamma_min) / (gamma_max - gamma_min) (the time of
  the linear schedule with the same end points). The noise label is 1000 t_ref, i.e. VDM's normalised gamma scaled
  like a DDPM timestep; it does not depend on the learned schedule.
- `MonotoneGamma` is the learned schedule gamma(t): VDM's monotone network (sec. 3.4 and Appendix H: linear layers
  with positive weights and a sigmoid in between), rescaled so that gamma(0) and gamma(1) are exactly the end
  points. Its derivative gamma'(t) is in closed form, so the bound needs no double backward.
- `VDMModel` is a `Preconditioned` denoiser that owns the schedule, so the optimiser, the EMA and checkpoints carry
  its parameters.

The continuous-time bound (VDM eqs. 11-17), in nats per image with D dimensions:

    -log p(x) <= KL(q(z_1 | x) || N(0, I))                         prior:          `prior_kl`
               + E_{z_0}[-log p(x | z_0)]                          reconstruction: `reconstruction_nll`
               + 0.5 E_{t ~ U(0, 1), eps}[gamma'(t) ||eps - eps_hat(z_t; t)||^2]   diffusion: `diffusion_loss`

with ||eps - eps_hat||^2 = ||x0 - D(x, sigma)||^2 / sigma^2 in the frame. With fixed end points the expected
diffusion term does not depend on the schedule between them (VDM sec. 5.1), so the schedule's interior is trained
to minimise the variance of the estimate instead (VDM sec. 5.2; `variance_minimising_grad`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .precond import Preconditioned

#: 8-bit data: level k in 0..255 sits at 2k/255 - 1 in [-1, 1] (data.convert.to_model_range)
LEVELS = 256


def _f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


@dataclass(frozen=True)
class VDM:
    """The VDM process: fixed end points of the log-SNR schedule, sigma = exp(gamma / 2)."""

    gamma_min: float = -13.3  # Kingma et al. 2021 (CIFAR-10): gamma(0)
    gamma_max: float = 5.0  # Kingma et al. 2021 (CIFAR-10): gamma(1)
    #: the learned schedule of the model this process belongs to (set by VDMModel; not part of the config, not
    #: compared); only `uniform_t_grid` reads it, every other method uses the fixed end points
    schedule: nn.Module | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    def __post_init__(self):
        if not (math.isfinite(self.gamma_min) and math.isfinite(self.gamma_max) and self.gamma_min < self.gamma_max):
            raise ValueError(f"VDM needs finite gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")

    def sigma(self, t: Tensor) -> Tensor:
        """Reference (linear log-SNR) schedule: sigma at time t in [0, 1]; the learned one shares its end points."""
        return torch.exp(0.5 * (self.gamma_min + _f64(t) * (self.gamma_max - self.gamma_min)))

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return (2 * torch.log(_f64(sigma)) - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def log_snr(self, sigma: Tensor) -> Tensor:
        return -2 * torch.log(_f64(sigma))

    @property
    def sigma_min(self) -> float:
        return math.exp(0.5 * self.gamma_min)

    @property
    def sigma_max(self) -> float:
        return math.exp(0.5 * self.gamma_max)

    def scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + _f64(sigma) ** 2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        """1000 x VDM's normalised gamma (gamma - gamma_min) / (gamma_max - gamma_min)."""
        return 1000 * self.t_of_sigma(sigma)

    def uniform_t_grid(self, n: int) -> Tensor:
        """(n + 1,) float64 sampling grid uniform in t under the learned schedule (the reference one without)."""
        if self.schedule is None:
            t = torch.linspace(1.0, 0.0, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
            return torch.cat([self.sigma(t), torch.zeros(1, dtype=torch.float64)])
        return schedule_grid(self.schedule, n)


class MonotoneGamma(nn.Module):
    """gamma(t) on [0, 1], strictly increasing, with gamma(0) = gamma_min and gamma(1) = gamma_max exactly.

    g~(t) = w1 t + (1/K) sum_k w3_k (2 sigmoid(w2_k (2t - 1) + b2_k) - 1)  with w1, w2, w3 = softplus(raw) > 0,
    the monotone network of VDM (Appendix H: positive-weight linear layers around a sigmoid, K = 1024 features),
    then gamma(t) = gamma_min + (gamma_max - gamma_min) (g~(t) - g~(0)) / (g~(1) - g~(0)). g~'(t) >= w1 > 0, so any
    weights give a strictly increasing gamma. At initialisation the sigmoid part is small, so gamma is close to
    the linear schedule. Computed in float64.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, features: int = 1024):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"MonotoneGamma needs gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.gamma_min, self.gamma_max, self.features = float(gamma_min), float(gamma_max), int(features)
        self.w1 = nn.Parameter(torch.tensor(math.log(math.e - 1)))  # softplus -> 1
        self.w2 = nn.Parameter(torch.randn(features))
        self.b2 = nn.Parameter(torch.randn(features))
        self.w3 = nn.Parameter(torch.full((features,), -6.0))  # softplus -> 0.0025: a small non-linear part

    def _tilde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(g~(t), g~'(t)) for t of any shape, float64."""
        w1 = F.softplus(self.w1.double())
        w2, b2, w3 = F.softplus(self.w2.double()), self.b2.double(), F.softplus(self.w3.double())
        u = t.unsqueeze(-1) * 2 - 1  # (..., 1)
        sg = torch.sigmoid(u * w2 + b2)  # (..., K)
        g = w1 * t + ((2 * sg - 1) * w3).mean(-1)
        dg = w1 + (sg * (1 - sg) * (4 * w2 * w3)).mean(-1)
        return g, dg

    def with_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(gamma(t), gamma'(t)), float64 of t's shape."""
        t = _f64(t).to(self.w2.device)
        g, dg = self._tilde(t)
        ends, _ = self._tilde(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))
        span = (self.gamma_max - self.gamma_min) / (ends[1] - ends[0])
        return self.gamma_min + span * (g - ends[0]), span * dg

    def forward(self, t: Tensor) -> Tensor:
        return self.with_derivative(t)[0]


class VDMModel(Preconditioned):
    """A Preconditioned denoiser for the VDM process that owns its learned schedule (`self.schedule`)."""

    def __init__(self, backbone: nn.Module, process: VDM, precond, autocast_dtype: torch.dtype | None = None,
                 features: int = 1024):
        super().__init__(backbone, process, precond, autocast_dtype)
        self.schedule = MonotoneGamma(process.gamma_min, process.gamma_max, features)
        # the process carries a reference to this model's schedule (a deep copy, e.g. the EMA, keeps the pairing)
        self.process = dataclasses.replace(process, schedule=self.schedule)


def schedule_grid(schedule: MonotoneGamma, n: int) -> Tensor:
    """(n + 1,) float64 descending sigmas exp(gamma(t) / 2) at t = linspace(1, 0, n), then 0 (VDM's sampler walks
    a uniform t grid; any of our samplers can walk this sigma grid)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps n must be an integer >= 1, got {n!r}")
    t = torch.linspace(1.0, 0.0, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        g, _ = schedule.with_derivative(t)
    return torch.cat([torch.exp(0.5 * g.cpu()), torch.zeros(1, dtype=torch.float64)])


# ------------------------------------------------------------------------------------------------ the bound
def low_discrepancy_t(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n,) float64 times t_i = (u + i / n) mod 1 with one u ~ U(0, 1): VDM's low-discrepancy sampler (sec. 5.2,
    Appendix I.1), unbiased for each t_i and with one sample in each interval [i/n, (i+1)/n)."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return torch.remainder(u + torch.arange(n, dtype=torch.float64) / n, 1.0)


def prior_kl(x0: Tensor, gamma_1: float) -> Tensor:
    """KL(q(z_1 | x0) || N(0, I)) in nats, summed over each row: q = N(alpha_1 x0, sigma_1^2 I),
    alpha_1^2 = sigmoid(-gamma_1), sigma_1^2 = sigmoid(gamma_1). (B,) float64."""
    a2, s2 = torch.sigmoid(_f64(-gamma_1)), torch.sigmoid(_f64(gamma_1))
    x = x0.double().flatten(1)
    return 0.5 * (a2 * x**2 + s2 - torch.log(s2) - 1).sum(1)


def reconstruction_nll(x0: Tensor, z0: Tensor, gamma_0: float, data: str = "8bit") -> Tensor:
    """-log p(x0 | z_0) in nats, summed over each row; z0 = x0 + sigma_0 n is the frame latent at t = 0 (z_0 / alpha_0),
    sigma_0 = exp(gamma_0 / 2). (B,) float64.

    "8bit": VDM's factorised decoder over the 256 levels v_k = 2k/255 - 1: p(v_k | z_0) = softmax_k(-(z_0 - v_k)^2
    / (2 sigma_0^2)) (Appendix C), a probability mass. "continuous": the density N(x0; z_0, sigma_0^2).
    """
    s2 = math.exp(gamma_0)
    x, z = x0.double().flatten(1), z0.double().flatten(1)
    if data == "continuous":
        return 0.5 * ((x - z) ** 2 / s2 + math.log(2 * math.pi * s2)).sum(1)
    if data != "8bit":
        raise ValueError(f"data must be '8bit' or 'continuous', got {data!r}")
    # softmax over the levels within 10 sigma_0 of z_0 (the rest weigh below exp(-50) each): a window of 2W+1 levels
    step = 2 / (LEVELS - 1)
    W = int(math.ceil(10 * math.sqrt(s2) / step)) + 1
    k = torch.round((x + 1) / step).clamp(0, LEVELS - 1)  # (B, D) the data's level
    if 2 * W + 1 >= LEVELS:  # a wide decoder: all levels
        ks = torch.arange(LEVELS, dtype=torch.float64, device=x.device).expand(*z.shape, LEVELS)
    else:
        kz = torch.round((z + 1) / step)  # nearest level to z_0
        ks = kz.unsqueeze(-1) + torch.arange(-W, W + 1, dtype=torch.float64, device=x.device)  # (B, D, 2W+1)
    logits = -0.5 * (z.unsqueeze(-1) - (ks * step - 1)) ** 2 / s2
    logits = logits.masked_fill((ks < 0) | (ks > LEVELS - 1), float("-inf"))
    logp = -0.5 * (z - (k * step - 1)) ** 2 / s2 - torch.logsumexp(logits, -1)
    return -logp.sum(1)


def diffusion_loss(sq_err: Tensor, gamma: Tensor, dgamma: Tensor) -> Tensor:
    """0.5 gamma'(t) ||eps - eps_hat||^2 = 0.5 gamma'(t) exp(-gamma(t)) ||x0 - D||^2 (VDM eq. 17 with
    SNR = exp(-gamma)); sq_err (B,) the per-row sum of ||x0 - D||^2. (B,) in sq_err's dtype promoted to float64."""
    return 0.5 * dgamma * torch.exp(-gamma) * sq_err.double()


def variance_minimising_grad(tensors: list[Tensor], loss: dict) -> None:
    """Make the schedule's parameters follow the gradient of E[L^2] instead of E[L] (VDM sec. 5.2: with fixed end
    points E[L] does not depend on the interior of the schedule, and d E[L^2] = d Var[L]).

    Registers a hook on each per-row tensor in `tensors` (gamma(t), gamma'(t), shape (B,)) that multiplies its
    incoming gradient by 2 L_b, where L_b = loss["value"][b] is read when the backward pass runs (fill it in after
    computing the loss). Only the schedule's parameters lie behind these tensors, so the network's own gradients
    are unchanged.
    """
    for t in tensors:
        if t.requires_grad:
            t.register_hook(lambda g: g * (2 * loss["value"].detach().to(g.dtype)))
