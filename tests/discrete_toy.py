"""An enumerable token distribution with its exact x0-posterior "network", for testing token diffusion.

N positions, K classes: the data is an explicit distribution over the K^N sequences (optionally one per class
label, the null label C giving their mixture). For a process q, the exact posterior of the whole sequence is
q(x0 | x_t) proportional to q(x0) prod_j q(x_t^j | x0^j); the network returns its per-position marginals
p(x0^j | x_t) as log-probabilities (B, N, K), the best a factorised x0-predictor can do.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor


def sequences(states: int, n: int) -> Tensor:
    """All states^n sequences (M, n) int64 in base-`states` order (index = sum x_j states^(n-1-j))."""
    return torch.tensor(list(itertools.product(range(states), repeat=n)), dtype=torch.long)


def index_of(x: Tensor, states: int) -> Tensor:
    """Base-`states` index of each row of x (B, n)."""
    n = x.shape[1]
    w = states ** torch.arange(n - 1, -1, -1)
    return (x * w).sum(1)


def toy_distribution(K: int, N: int, seed: int, sharpness: float = 2.5) -> Tensor:
    """A random distribution over the K^N sequences, float64 (K^N,)."""
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(K ** N, generator=g, dtype=torch.float64)).softmax(0)


class ExactTokenPosterior:
    """net(x_t (B, N), t (B,), cond) -> (B, N, K) log p(x0^j | x_t) under the process and the data.

    data: (M,) one distribution, or (C, M) one per class label (cond["label"] = C selects their mixture with
    weights class_weights, the unconditional model)."""

    def __init__(self, process, data: Tensor, N: int, class_weights: Tensor | None = None):
        self.process, self.N, self.K = process, N, process.num_classes
        self.seqs = sequences(self.K, N)  # (M, N)
        data = data.to(torch.float64)
        if data.ndim == 1:
            data = data[None]
        C = data.shape[0]
        w = torch.full((C,), 1.0 / C, dtype=torch.float64) if class_weights is None else class_weights
        self.table = torch.cat([data, (w[:, None] * data).sum(0, keepdim=True)]) if C > 1 else data
        self.num_classes = C if C > 1 else 0
        self.calls = 0

    def posterior(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """q(x0 | x_t) over the M data sequences, (B, M)."""
        lik = self.process.likelihood(x_t, t)  # (B, N, K)
        B = x_t.shape[0]
        per = lik[:, torch.arange(self.N)[None, :], self.seqs]  # (B, M, N)
        if self.num_classes and cond is not None:
            prior = self.table[cond["label"]]
        else:
            prior = self.table[-1].expand(B, -1)
        post = per.prod(-1) * prior
        return post / post.sum(1, keepdim=True)

    def __call__(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        self.calls += 1
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1)
        post = self.posterior(x, t, cond)  # (B, M)
        hot = torch.nn.functional.one_hot(self.seqs, self.K).to(torch.float64)  # (M, N, K)
        marg = torch.einsum("bm,mnk->bnk", post, hot)
        return marg.clamp_min(1e-300).log().reshape(*shape, self.K)


def chain_distribution(process, net, N: int, times, cond_label=None) -> Tensor:
    """Exact distribution over the K^N data sequences of ancestral sampling over `times` (descending to 0) with a
    factorised reverse model: sequence-level (S^N, S^N) transition matrices chained from the prior."""
    S, K = process.num_states, process.num_classes
    allx = sequences(S, N)  # (S^N, N)
    prior = process.prior_probs((1, N))[0]  # (N, S)
    p = prior[torch.arange(N)[None, :], allx].prod(-1)  # (S^N,)
    cond = None
    for t, s in zip(times[:-1], times[1:]):
        live = p > 0
        xs = allx[live]
        tt = torch.full((xs.shape[0],), t, dtype=torch.long)
        if cond_label is not None:
            cond = {"label": torch.full((xs.shape[0],), cond_label, dtype=torch.long)}
        p0 = net(xs, tt, cond).softmax(-1)
        R = process.reverse_probs(xs, tt, torch.full_like(tt, s), p0)  # (L, N, S)
        M = R[:, torch.arange(N)[None, :], allx].prod(-1)  # (L, S^N)
        p = p[live] @ M
    data_rows = (allx < K).all(1)
    out = torch.zeros(K ** N, dtype=torch.float64)
    out[index_of(allx[data_rows], K)] = p[data_rows]
    return out


def empirical(tokens: Tensor, K: int) -> Tensor:
    """Empirical distribution over the K^N sequences of samples (B, N)."""
    idx = index_of(tokens.reshape(tokens.shape[0], -1), K)
    return torch.bincount(idx, minlength=K ** tokens.reshape(tokens.shape[0], -1).shape[1]).to(torch.float64) / len(idx)


def tv(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())
