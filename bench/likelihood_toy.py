#!/usr/bin/env python
"""PF-ODE likelihood beside the discrete variational bound on a trained toy model with a known density.

    flock /tmp/td-heavy.lock nice -n 5 .venv/bin/python bench/likelihood_toy.py --out bench/results/likelihood_toy.json

Data: a 2-D mixture of four Gaussians (tests/analytic.py `mixture_2d`), so the true -log p of every test point is
known. Model: a small MLP in a discrete VP process (T = 1000, linear betas, eps head, DDPM's simple loss), trained
for --steps Adam steps on fresh samples. The same test points are then scored four ways (nats per dimension of the
density, continuous data, no dequantisation):

- true:  -log p_data(x) of the mixture;
- ode:   the PF-ODE likelihood at sigma_min = sigma_1 of the table (exact divergence, dopri5, rtol = atol = 1e-6);
- vlb:   the discrete bound over all T terms (core.vlb, variance "small" and "large", data="continuous");
- and the same two estimators driven by the mixture's exact denoiser (a perfectly trained model), which separates
  the estimators' own gaps from the training error.

Reported: mean and standard error over test points of each, and of the paired differences vlb - ode (the error
bar that decides "agree"). The JSON and a Markdown table go to --out and beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from analytic import mixture_2d  # noqa: E402
from torchdiffusion.core.objectives import Objective  # noqa: E402
from torchdiffusion.core.precond import Preconditioned, Preconditioner  # noqa: E402
from torchdiffusion.core.processes import VPDiscrete  # noqa: E402
from torchdiffusion.core.vlb import discrete_vlb_bpd  # noqa: E402
from torchdiffusion.sampling.likelihood import mean_and_stderr, ode_log_likelihood  # noqa: E402


class MLP(nn.Module):
    """Backbone F(x_in, c_noise): sinusoidal features of the (fractional) timestep, 3 hidden SiLU layers."""

    def __init__(self, dim: int = 2, width: int = 256, freqs: int = 16):
        super().__init__()
        self.register_buffer("w", torch.exp(torch.linspace(0, math.log(1000), freqs)) / 1000)
        self.net = nn.Sequential(nn.Linear(dim + 2 * freqs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, c_noise, cond=None):
        a = c_noise.float()[:, None] * self.w[None]
        return self.net(torch.cat([x, a.sin(), a.cos()], dim=1))


class ExactModel:
    """The mixture's exact denoiser presented like a model (a `.process` for the VLB)."""

    def __init__(self, mix, process):
        self.mix, self.process = mix, process

    def __call__(self, x, sigma, cond=None):
        return self.mix(x.double(), sigma.double()).to(x.dtype)


def gmm_log_density(mix, x: torch.Tensor) -> torch.Tensor:
    var = mix.variances[None]  # (1, K, d)
    diff = x[:, None, :] - mix.means[None]
    log_n = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
    return torch.logsumexp(torch.log(mix.weights)[None] + log_n, dim=1)


def score(model, x, process, args, label):
    t0 = time.perf_counter()
    r = ode_log_likelihood(model, x, sigma_min=process.sigma_min, sigma_max=process.sigma_max, divergence="exact",
                           rtol=args.rtol, atol=args.rtol)
    ode = -r.log_p / x.shape[1]
    t_ode = time.perf_counter() - t0
    out = {"ode": ode, "ode_nfe_mean": float(r.nfe.double().mean()), "ode_seconds": round(t_ode, 1)}
    for variance in ("small", "large"):
        t0 = time.perf_counter()
        bpd = discrete_vlb_bpd(model, x.float(), torch.Generator().manual_seed(1), variance=variance,
                               data="continuous", process=process)
        out[f"vlb_{variance}"] = bpd * math.log(2)  # nats/dim
        out[f"vlb_{variance}_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{label}: scored in {t_ode:.1f} s (ode) ", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--n", type=int, default=1000, help="test points")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "likelihood_toy.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mix = mixture_2d()
    process = VPDiscrete(1000, "linear")
    model = Preconditioned(MLP(), process, Preconditioner("eps"))
    obj = Objective("discrete", "eps")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(a.steps):
        x0 = mix.sample(a.batch, g, dtype=torch.float32)
        loss = obj.loss(model, x0, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval().requires_grad_(False)
    x = mix.sample(a.n, torch.Generator().manual_seed(123), dtype=torch.float64)
    true = -gmm_log_density(mix, x) / x.shape[1]
    rows = {"trained MLP": score(model, x, process, a, "trained"),
            "exact denoiser": score(ExactModel(mix, process), x, process, a, "exact")}
    result = {"data": "mixture_2d (4 Gaussians, 2-D)", "n_test": a.n, "train_steps": a.steps, "batch": a.batch,
              "train_seconds": round(train_s, 1), "process": "vp_discrete T=1000 linear, eps head, simple loss",
              "ode": f"exact divergence, dopri5, rtol=atol={a.rtol:g}, sigma_min={process.sigma_min:.4g}, "
                     f"sigma_max={process.sigma_max:.4g}",
              "vlb": "all T terms, data=continuous (Gaussian decoder)", "units": "nats per dimension",
              "true": dict(zip(("mean", "stderr"), mean_and_stderr(true))), "models": {}}
    for name, r in rows.items():
        entry = {"ode_nfe_mean": r["ode_nfe_mean"]}
        for key in ("ode", "vlb_small", "vlb_large"):
            entry[key] = dict(zip(("mean", "stderr"), mean_and_stderr(r[key])))
        for key in ("vlb_small", "vlb_large"):
            entry[f"{key} - ode"] = dict(zip(("mean", "stderr"), mean_and_stderr(r[key] - r["ode"])))
        entry["ode - true"] = dict(zip(("mean", "stderr"), mean_and_stderr(r["ode"] - true)))
        result["models"][name] = entry
    text = json.dumps(result, indent=2)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    lines = ["| model | ode | vlb (small) | vlb (large) | vlb(small) - ode | vlb(large) - ode | ode - true |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda d: f"{d['mean']:.4f} ± {d['stderr']:.4f}"  # noqa: E731
    for name, e in result["models"].items():
        lines.append(f"| {name} | {fmt(e['ode'])} | {fmt(e['vlb_small'])} | {fmt(e['vlb_large'])} | "
                     f"{fmt(e['vlb_small - ode'])} | {fmt(e['vlb_large - ode'])} | {fmt(e['ode - true'])} |")
    lines.append(f"\nTrue -log p: {fmt(result['true'])} nats/dim over the same {a.n} test points "
                 f"(mean ± standard error over points).")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
