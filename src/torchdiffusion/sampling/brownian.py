"""Noise sources for stochastic samplers: fresh per-row draws, and a per-row Brownian tree.

A noise source is a callable `noise(sigma, sigma_next) -> z` returning a (B, ...) standard normal tensor for
the step from sigma to sigma_next; a sampler multiplies it by the step's noise scale. Two kinds:

- `GaussianNoise`: a fresh draw per call from the per-row generators (sampling.noise), so row b depends on
  its own seed only. Right for ancestral samplers, whose steps are fixed by the grid.
- `BrownianTreeNoise`: z = (W(u') - W(u)) / sqrt(|u' - u|), u = log sigma, for one Brownian path W per
  row, a deterministic function of the row's seed. Increments over disjoint intervals are independent
  N(0, 1) after scaling, and the path is the same whatever intervals are asked for, so W(s, u) =
  W(s, t) + W(t, u) exactly. An SDE solver that refines or rejects steps (adaptive step size), or is run
  at several NFE, then integrates the *same* Brownian path, and its solutions converge as the steps shrink
  (strong convergence) instead of being a new random draw at every setting.

The Brownian tree (after Gaines & Lyons 1997, "Variable step size control in the numerical solution of
stochastic differential equations"; the same idea as torchsde's BrownianTree, implemented here from the
Brownian-bridge law):

    W(t0) = 0, W(t1) = sqrt(t1 - t0) z_root.
    For a node interval [a, b] with known W(a), W(b), the midpoint m = (a + b) / 2 has the bridge law
        W(m) | W(a), W(b) ~ N((W(a) + W(b)) / 2, (b - a) / 4),
    drawn with the node's own normal z_node. W(t) for any t is found by bisection from the root down to a
    leaf interval of length <= `leaf`; inside the leaf, W(t) is the bridge value
        W(a) + (t - a) / (b - a) (W(b) - W(a)) + sqrt((t - a)(b - t) / (b - a)) z_leaf.

Every z comes from a counter-based seed: splitmix64 of (row seed, level, node index), with one z_leaf per
leaf, so W(t) depends on nothing but the row seed and t, and is continuous in t (a query time that differs
in the last bit, e.g. exp(-lambda) computed two ways, moves W(t) very little). Two query points inside the
same leaf share z_leaf, so their joint law is slightly off; the samplers' leaf (BrownianTreeNoise) is
2^-16 of the log-sigma range, far below any step a sampler takes. The path from the root to the last
queried point is cached, so queries that move monotonically (every sampler) cost about log2(|step| / leaf)
node draws each.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from torchdiffusion.protocols import Generators
from torchdiffusion.sampling.noise import check_generators, randn_like
from torchdiffusion.sampling.steps import SamplerError

#: noise(sigma, sigma_next) -> (B, ...) standard normal tensor for that step.
NoiseSampler = Callable[[float, float], Tensor]

NOISE_KINDS = ("gaussian", "brownian")
_MASK = (1 << 64) - 1
_MAX_DEPTH = 60


def _splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0x5DEECE66D
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK))
    return h


def row_seeds(generator: Generators, batch: int) -> list[int]:
    """One 63-bit seed per row, drawn from the row's own generator (a list of B generators), from one shared
    generator (B draws, batch-dependent), or from torch's global generator (None)."""
    check_generators(generator, batch)
    if isinstance(generator, (list, tuple)):
        return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item()) for g in generator]
    if isinstance(generator, torch.Generator):
        return [int(v) for v in torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device)]
    return [int(v) for v in torch.randint(0, 2**62, (batch,))]


class BrownianTree:
    """Brownian paths W_b on [t0, t1], one per seed, each of shape `shape`; W_b(t0) = 0.

    tree(t) -> (B, *shape) tensor of W_b(t); tree.increment(s, t) = W(t) - W(s). Deterministic given the
    seeds and t. `leaf`: the bisection stops at intervals of this length (default (t1 - t0) * 2^-40)."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], t0: float, t1: float, *,
                 leaf: Optional[float] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise SamplerError(f"a Brownian tree needs a finite interval t0 < t1, got [{t0}, {t1}]")
        if not seeds:
            raise SamplerError("a Brownian tree needs at least one seed (one per batch row)")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(s) for s in shape)
        self.t0, self.t1 = t0, t1
        leaf = (t1 - t0) * 2.0**-40 if leaf is None else float(leaf)
        if not leaf > 0:
            raise SamplerError(f"the Brownian tree's leaf length must be > 0, got {leaf}")
        self.depth = min(_MAX_DEPTH, max(0, math.ceil(math.log2((t1 - t0) / leaf))))
        self.dtype, self.device = dtype, device
        self._draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._gen = torch.Generator()
        w1 = self._normal(_key(0, 0, 0)) * math.sqrt(t1 - t0)
        # cached path: level -> (a, b, W(a), W(b), index); level 0 is the root interval
        self._path: list[tuple[float, float, Tensor, Tensor, int]] = [(t0, t1, torch.zeros_like(w1), w1, 0)]
        self._points: dict[float, Tensor] = {}

    def _normal(self, key: int) -> Tensor:
        """(B, *shape) standard normal: row b from the seed key mixed with seeds[b]. Drawn in float64 for a float64
        tree, else in float32 (4-5x faster on CPU; the path's values then carry float32 round-off, ~1e-7)."""
        rows = []
        for s in self.seeds:
            self._gen.manual_seed(_key(s, key))
            rows.append(torch.randn(self.shape, generator=self._gen, dtype=self._draw_dtype))
        return torch.stack(rows)

    def __call__(self, t: float) -> Tensor:
        t = float(t)
        if not (self.t0 <= t <= self.t1):
            raise SamplerError(f"Brownian tree queried at {t}, outside its interval [{self.t0}, {self.t1}]")
        hit = self._points.get(t)
        if hit is None:
            hit = self._eval(t)
            if len(self._points) >= 8:
                self._points.pop(next(iter(self._points)))
            self._points[t] = hit
        return hit.to(dtype=self.dtype, device=self.device)

    def increment(self, s: float, t: float) -> Tensor:
        """W(t) - W(s) (either order of s and t)."""
        return self(t) - self(s)

    def _eval(self, t: float) -> Tensor:
        path = self._path
        level = 0  # deepest cached level whose interval contains t
        while level + 1 < len(path) and path[level + 1][0] <= t <= path[level + 1][1]:
            level += 1
        del path[level + 1:]
        a, b, wa, wb, idx = path[level]
        while True:
            if t == a:
                return wa
            if t == b:
                return wb
            if level == self.depth:
                break
            m = 0.5 * (a + b)
            wm = 0.5 * (wa + wb) + math.sqrt(0.25 * (b - a)) * self._normal(_key(1, level + 1, 2 * idx + 1))
            if t < m:
                b, wb, idx = m, wm, 2 * idx
            else:
                a, wa, idx = m, wm, 2 * idx + 1
            level += 1
            path.append((a, b, wa, wb, idx))
        frac = (t - a) / (b - a)
        std = math.sqrt((t - a) * (b - t) / (b - a))
        return wa + frac * (wb - wa) + std * self._normal(_key(2, level, idx))


class GaussianNoise:
    """Fresh standard normal draws like `like` (B, ...) from the per-row generators, one per call."""

    def __init__(self, like: Tensor, generator: Generators):
        self.like, self.generator = like, generator

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return randn_like(self.like, self.generator)


class BrownianTreeNoise:
    """z(sigma, sigma') = (W(u') - W(u)) / sqrt(|u' - u|) with u = log sigma, for one Brownian path per row on
    [log sigma_min, log sigma_max]. Any time variable gives independent N(0, 1) values for disjoint steps; log
    sigma is the one in which these solvers' noise scales are uniform (s' sqrt(1 - e^{-2 eta h}) ~ s' sqrt(2 eta h)
    for h = log(s / s')), and it gives a Karras grid's small steps near sigma_min the same resolution as the
    large ones. The bisection stops at leaves of 2^-16 of the log range (about 1.6e-4 in log sigma for
    [0.002, 80]), about 9 node draws per query for typical steps.

    With a list of B generators, row b's path is seeded from generator[b] alone (batch-independent; each node
    costs B small draws). With one generator (or None) one seed drives the whole batch's path, drawn in one
    go per node (faster; the rows then depend on the batch, as any draw from a shared generator does)."""

    def __init__(self, like: Tensor, sigma_min: float, sigma_max: float, generator: Generators, *,
                 leaf: Optional[float] = None):
        check_generators(generator, like.shape[0])
        if not (0 < sigma_min < sigma_max < math.inf):
            raise SamplerError(f"Brownian noise needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        u0, u1 = math.log(sigma_min), math.log(sigma_max)
        leaf = (u1 - u0) * 2.0**-16 if leaf is None else leaf
        self.per_row = isinstance(generator, (list, tuple))
        if self.per_row:
            seeds, shape = row_seeds(generator, like.shape[0]), tuple(like.shape[1:])
        else:
            seeds, shape = row_seeds(generator, 1), tuple(like.shape)
        self.tree = BrownianTree(seeds, shape, u0, u1, leaf=leaf, dtype=like.dtype, device=like.device)

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        lo, hi = self.tree.t0, self.tree.t1
        if not (sigma > 0 and sigma_next > 0):
            raise SamplerError(f"Brownian noise is defined for sigma > 0, asked for [{sigma}, {sigma_next}]")
        u, v = min(max(math.log(sigma), lo), hi), min(max(math.log(sigma_next), lo), hi)
        if u == v:
            raise SamplerError(f"Brownian noise asked for an empty interval [{sigma}, {sigma_next}] within its "
                               f"range [{math.exp(lo)}, {math.exp(hi)}]")
        z = self.tree.increment(u, v) / math.sqrt(abs(v - u))
        return z if self.per_row else z[0]


def make_noise(kind: str, like: Tensor, sigma_min: float, sigma_max: float, generator: Generators) -> NoiseSampler:
    """The noise source named `kind` ("gaussian" or "brownian") for x shaped like `like`."""
    if kind == "gaussian":
        return GaussianNoise(like, generator)
    if kind == "brownian":
        return BrownianTreeNoise(like, sigma_min, sigma_max, generator)
    raise SamplerError(f"unknown noise {kind!r}; valid: {', '.join(NOISE_KINDS)}")
