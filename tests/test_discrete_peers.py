"""Parity of the mask-and-replace process with diffusers' VQDiffusionScheduler (Gu et al. 2022 as diffusers ships
it): the same x0 log-probabilities in give the same distribution of x_{t-1} out, at every step.

Index map: diffusers' timestep j in 0..T-1 is our t = j + 1 (its cumulative tables hold t = 1..T); its step j
turns x_{j+1} into x_j; at j = 0 it samples x_0 from the network's x0 distribution. Its q_posterior returns
unnormalised log-probabilities over the K + 1 classes (mask last), the same layout as ours with classes last.
Runs only where diffusers is importable (the peers environment: `make test-peers`)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from torchdiffusion.core.discrete import mask_replace  # noqa: E402
from torchdiffusion.sampling.discrete import sample_ancestral  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("T", [10, 100])
def test_reverse_step_matches_vq_diffusion_scheduler(T):
    from diffusers import VQDiffusionScheduler
    K, B, N = 7, 3, 12
    sched = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    p = mask_replace(K, T)
    g = torch.Generator().manual_seed(0)
    for j in range(1, T):
        log_p0 = torch.randn(B, K, N, generator=g).log_softmax(1)  # diffusers' layout (B, K, N)
        x_t = torch.randint(0, K + 1, (B, N), generator=g)
        theirs = sched.q_posterior(log_p0, x_t, torch.tensor(j)).double().softmax(1).permute(0, 2, 1)
        ours = p.reverse_probs(x_t, j + 1, j, log_p0.double().exp().permute(0, 2, 1))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # measured 5e-7 (diffusers is float32)


def test_ancestral_sampling_matches_the_scheduler_in_distribution():
    """A fixed x0 distribution per token (no network): our sampler and the scheduler's loop give the same token
    frequencies (TV of per-position marginals within Monte-Carlo error)."""
    from diffusers import VQDiffusionScheduler
    K, N, T, n = 4, 3, 20, 4000
    g = torch.Generator().manual_seed(1)
    table = torch.randn(N, K, generator=g).double().log_softmax(-1)
    sched = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    sched.set_timesteps(T)
    x = torch.full((n, N), K, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    for j in sched.timesteps:
        out = table.T.float()[None].expand(n, K, N)
        x = sched.step(out, j, x, generator=gen).prev_sample
    p = mask_replace(K, T)
    ours = sample_ancestral(lambda x_t, t, c: table[None].expand(x_t.shape[0], N, K), p, (n, N),
                            generator=torch.Generator().manual_seed(3))
    for pos in range(N):
        a = torch.bincount(x[:, pos], minlength=K).double() / n
        b = torch.bincount(ours[:, pos], minlength=K).double() / n
        assert 0.5 * float((a - b).abs().sum()) < 0.05, pos
