"""Training objectives: a density over noise levels times a weighting, in the one frame.

Notation: x = x0 + sigma n. With D = c_skip x + c_out F, the per-sample loss is (Karras et al. 2022, eq. 8)

    L(x0, sigma) = lambda(sigma) * c_out^2 * mean || F - (x0 - c_skip x) / c_out ||^2  =  lambda(sigma) * mean || D - x0 ||^2,

computed in the first form (the backbone's own target) for numerical stability. lambda is the weighting of the
x0 error, so each named weighting means the same thing whatever the output head:

| weighting | lambda(sigma)                 | source |
|-----------|-------------------------------|--------|
| eps       | 1 / sigma^2                   | DDPM "simple" loss (Ho et al. 2020): unit weight on the noise error |
| x0        | 1                             | |
| v         | (sigma^2 + 1) / sigma^2       | v-loss (Salimans & Ho 2022): unit weight on the v error (sigma_data = 1) |
| edm       | (sigma^2 + sd^2) / (sigma sd)^2 | Karras et al. 2022, eq. 8 and Table 1 |
| min_snr   | min(1 / sigma^2, gamma)       | Min-SNR-gamma (Hang et al. 2023), SNR = 1 / sigma^2, gamma = 5 |

Densities: "discrete" (t uniform on 0..T-1 of a VPDiscrete process, DDPM), "uniform_t" (t uniform on [t_min, 1] of a
continuous process, Song et al. 2021) and "lognormal" (ln sigma ~ N(P_mean, P_std^2), EDM).

Variational objectives (time formulations of Nichol & Dhariwal 2021, "iDDPM", and Kingma et al. 2021, "VDM"):

| name | kind | what |
|------|------|------|
| hybrid     | weighting | L_simple + lambda L_vlb, lambda = 0.001 (iDDPM sec. 3.1); needs a learned-variance model |
| importance | density   | t ~ p_t ∝ sqrt(E[L_t^2]) from a history of the last 10 losses per t, loss weighted by 1/(T p_t) (iDDPM sec. 3.3) |
| vdm        | density   | VDM's low-discrepancy uniform t (sec. 5.2), passed on as the VDM process's reference sigma(t) |
| vlb        | weighting | VDM's continuous-time bound in bits/dim: prior + reconstruction + 0.5 gamma'(t) ||eps - eps_hat||^2 (eq. 17) |

The hybrid per-sample loss is mean ||eps - eps_hat||^2 + lambda T L_t, with L_t the bound's term of timestep t in
bits/dim (core.vlb.reverse_step_nll / D ln 2) computed with the mean's gradient stopped, so the variance channels
learn only from L_vlb and the mean only from L_simple (iDDPM sec. 3.1). T L_t is the one-sample estimate of
L_vlb = sum_t L_t under uniform t (iDDPM's reference code scales its vb term by T / 1000 likewise). Timestep 0's term
is the discretised decoder of 8-bit data.

The importance density keeps its loss history in `Objective.state` (a `LossHistory` module with buffers), which the
trainer checkpoints; the history is updated by losses computed in training mode (model.training) only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..protocols import Cond
from . import vdm, vlb
from .precond import Preconditioned, reverse_step_variances
from .processes import SCORE_SDES, VPDiscrete, NoiseProcess

DENSITIES = ("discrete", "uniform_t", "lognormal", "importance", "vdm")
WEIGHTINGS = ("eps", "x0", "v", "edm", "min_snr", "hybrid", "vlb")


class LossHistory(nn.Module):
    """Importance sampling of discrete timesteps from a loss history (Nichol & Dhariwal 2021, sec. 3.3).

    Keeps the last `history` per-sample losses of each timestep t (buffers, so a checkpoint carries them).
    Until every t has `history` entries, t is uniform; then p_t ∝ sqrt(mean of the stored L_t^2), mixed with a
    uniform floor epsilon / T (epsilon = 0.001) so that no weight 1 / (T p_t) can blow up. `probs` holds the
    distribution of the latest draw; `weights(t)` = 1 / (T probs[t]) makes the weighted loss an unbiased estimate
    of the uniform-t loss.
    """

    def __init__(self, T: int, history: int = 10, uniform_floor: float = 0.001):  # iDDPM sec. 3.3: 10
        super().__init__()
        self.T, self.history, self.uniform_floor = int(T), int(history), float(uniform_floor)
        self.register_buffer("losses", torch.zeros(self.T, self.history, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(self.T, dtype=torch.int64))
        self.register_buffer("probs", torch.full((self.T,), 1.0 / self.T, dtype=torch.float64))

    def current(self) -> Tensor:
        """(T,) float64 sampling distribution from the history as it is now."""
        if int(self.counts.min()) < self.history:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64, device=self.losses.device)
        p = self.losses.pow(2).mean(1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_floor) + self.uniform_floor / self.T

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n,) int64 timesteps from the current distribution, which is kept in `probs` for `weights`."""
        with torch.no_grad():
            self.probs.copy_(self.current())
        return torch.multinomial(self.probs.cpu(), n, replacement=True, generator=generator)

    def weights(self, t: Tensor) -> Tensor:
        """(B,) float64 1 / (T p_t) under the distribution of the latest draw."""
        return 1.0 / (self.T * self.probs.to(t.device)[t])

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each per-sample loss to its timestep's history (oldest entries drop out)."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if not math.isfinite(li):
                continue
            c = int(self.counts[ti])
            if c < self.history:
                self.losses[ti, c] = li
            else:
                self.losses[ti] = torch.roll(self.losses[ti], -1)
                self.losses[ti, -1] = li
            self.counts[ti] = c + 1


@dataclass(frozen=True)
class Objective:
    density: str = "discrete"
    weighting: str = "eps"
    P_mean: float = -1.2  # Karras et al. 2022, Table 1
    P_std: float = 1.2  # Karras et al. 2022, Table 1
    sigma_data: float = 0.5  # Karras et al. 2022
    min_snr_gamma: float = 5.0  # Hang et al. 2023
    t_min: float = 1e-5  # Song et al. 2021: smallest training time for continuous processes
    vlb_lambda: float = 0.001  # Nichol & Dhariwal 2021, sec. 3.1: weight of L_vlb in the hybrid loss
    state: nn.Module | None = field(default=None, compare=False, repr=False)  # LossHistory of "importance"

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise ValueError(f"unknown sigma density {self.density!r}; valid: {', '.join(DENSITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.density == "importance" and not isinstance(self.state, LossHistory):
            raise ValueError("the 'importance' density needs state=LossHistory(T) for the model's T timesteps")

    def sample_sigma(self, n: int, process: NoiseProcess, generator: torch.Generator | None = None) -> Tensor:
        """(n,) float32 training noise levels."""
        if self.density == "discrete":
            if not isinstance(process, VPDiscrete):
                raise ValueError("the 'discrete' sigma density needs a discrete VP process; "
                                 "use 'uniform_t' or 'lognormal' for continuous processes")
            t = torch.randint(0, process.T, (n,), generator=generator)
            return process.sigmas()[t].float()
        if self.density == "importance":
            if not isinstance(process, VPDiscrete) or process.T != self.state.T:
                raise ValueError("the 'importance' density needs a discrete VP process with the history's T timesteps")
            return process.sigmas()[self.state.draw(n, generator)].float()
        if self.density == "vdm":
            if not isinstance(process, vdm.VDM):
                raise ValueError("the 'vdm' density needs the vdm process (model.process.kind vdm)")
            return process.sigma(vdm.low_discrepancy_t(n, generator)).float()
        if self.density == "uniform_t":
            if not isinstance(process, SCORE_SDES):
                raise ValueError("the 'uniform_t' density needs a continuous Score SDE process "
                                 "(vp_continuous, sub_vp or ve)")
            t = self.t_min + (1 - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
            return process.sigma(t).float()
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.P_mean + self.P_std * z).exp().float()

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma), the weight of the squared x0 error, float64 (B,) (the hybrid loss's L_simple part is
        the eps weighting; the vlb weighting has no fixed lambda: see `loss`)."""
        if self.weighting == "vlb":
            raise ValueError("the 'vlb' weighting depends on the learned schedule, not on sigma alone")
        s2 = sigma.double() ** 2
        if self.weighting == "hybrid":
            return 1 / s2
        sd2 = self.sigma_data**2
        if self.weighting == "eps":
            return 1 / s2
        if self.weighting == "x0":
            return torch.ones_like(s2)
        if self.weighting == "v":
            return (s2 + 1) / s2
        if self.weighting == "edm":
            return (s2 + sd2) / (s2 * sd2)
        return torch.clamp(1 / s2, max=self.min_snr_gamma)

    def loss(self, model: Preconditioned, x0: Tensor, cond: Cond = None, *, sigma: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss (B,). sigma and noise are drawn from `generator` unless given (fixed validation noise)."""
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], model.process, generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        if self.weighting == "vlb":
            return self._vdm_loss(model, x0, cond, sigma, noise)
        x = x0 + sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1)) * noise
        if self.weighting == "hybrid":
            loss = self._hybrid_loss(model, x0, x, sigma, cond)
        else:
            F, c_skip, c_out = model.raw(x, sigma, cond)
            target = (x0 - c_skip * x) / c_out
            w = (self.weight(sigma).to(x0.device) * c_out.reshape(-1).double() ** 2).float()
            loss = w * (F - target).pow(2).flatten(1).mean(1)
        if self.density == "importance":
            t = _timestep(model.process, sigma)
            if model.training and torch.is_grad_enabled():
                self.state.update(t, loss)
            loss = loss * self.state.weights(t).to(loss.device).float()
        return loss

    def _hybrid_loss(self, model, x0: Tensor, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """L_simple + lambda T L_t (bits/dim), the mean's gradient stopped in L_t (iDDPM sec. 3.1)."""
        process = model.process
        if not getattr(model, "learned_variance", False) or not isinstance(process, VPDiscrete):
            raise ValueError("the 'hybrid' weighting needs a learned-variance model on a discrete VP process "
                             "(model.variance learned, model.process.kind vp_discrete)")
        F, v, c_skip, c_out = model.raw_with_variance(x, sigma, cond)
        target = (x0 - c_skip * x) / c_out
        w = (self.weight(sigma).to(x0.device) * c_out.reshape(-1).double() ** 2).float()
        simple = w * (F - target).pow(2).flatten(1).mean(1)
        D = (c_skip * x + c_out * F).detach()
        t = _timestep(process, sigma)
        table = process.sigmas().to(x0.device)
        s = table[t]
        s_next = torch.where(t > 0, table[(t - 1).clamp(min=0)], torch.zeros_like(s))
        clip = reverse_step_variances(table[1], table[0])[0].expand(s.shape)
        log_var = vlb.step_log_variance("learned", s, s_next, clip, v)
        nats = vlb.reverse_step_nll(x0, x, D, log_var, s, s_next, "8bit")
        L_t = nats / (x0[0].numel() * math.log(2))
        return simple + (self.vlb_lambda * process.T * L_t).float()

    def _vdm_loss(self, model, x0: Tensor, cond: Cond, sigma: Tensor, noise: Tensor) -> Tensor:
        """VDM's bound in bits/dim per sample (VDM eqs. 11-17): the learned gamma at the drawn time t, read back
        from the reference sigma(t) the density passed on; the schedule follows the variance-minimising gradient."""
        process, schedule = model.process, getattr(model, "schedule", None)
        if not isinstance(process, vdm.VDM) or schedule is None:
            raise ValueError("the 'vlb' weighting needs a VDM model (model.process.kind vdm)")
        t = process.t_of_sigma(sigma.detach()).clamp(0, 1)
        gamma, dgamma = schedule.with_derivative(t)
        gamma, dgamma = gamma.to(x0.device), dgamma.to(x0.device)
        sig = torch.exp(0.5 * gamma)  # (B,) float64, differentiable in the schedule
        x = x0 + sig.float().reshape((-1,) + (1,) * (x0.ndim - 1)) * noise
        F, c_skip, c_out = model.raw(x, sig.float(), cond)
        target = (x0 - c_skip * x) / c_out
        sq = (c_out.reshape(-1).double() ** 2) * (F - target).double().pow(2).flatten(1).sum(1)
        nats = vdm.diffusion_loss(sq, gamma, dgamma)
        # the reconstruction term reuses n for z_0 = x0 + sigma_0 n: each term stays unbiased, the sum too
        z0 = x0 + math.exp(0.5 * process.gamma_min) * noise
        nats = nats + vdm.prior_kl(x0, process.gamma_max) + vdm.reconstruction_nll(x0, z0, process.gamma_min, "8bit")
        bpd = nats / (x0[0].numel() * math.log(2))
        box = {"value": bpd}
        vdm.variance_minimising_grad([gamma, dgamma], box)
        return bpd.float()


def _timestep(process: VPDiscrete, sigma: Tensor) -> Tensor:
    """(B,) int64 nearest discrete timestep of each sigma (training sigmas are table entries)."""
    return process.t_of_sigma(sigma.detach()).round().long().clamp(0, process.T - 1).to(sigma.device)
