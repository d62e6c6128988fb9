"""torchdiffusion: a diffusion-model lab in PyTorch.

Every model lives in one frame, x = x0 + sigma * n, and is used through one contract:
a denoiser D(x, sigma, cond) that returns an estimate of E[x0 | x]. See docs/DESIGN.md.
"""

__version__ = "0.1.0"
