"""torchdiffusion: a diffusion-model lab in PyTorch.

Every model lives in one frame, x = x0 + sigma * n, and is used through one contract:
a denoiser D(x, sigma, cond) that returns an estimate of E[x0 | x]. See docs/DESIGN.md.

    import torchdiffusion
    pipe = torchdiffusion.load("runs/mnist")          # a run folder or a checkpoint folder (docs/api.md)
    images = pipe.sample(range(16), steps=18)        # uint8 (16, 1, 28, 28), as `torchdiffusion sample`
"""

__version__ = "0.1.0"


def load(path, device="cpu", ema: bool = True):
    """A trained run folder (its latest verified checkpoint) or a checkpoint folder as one object
    (config.pipeline.DiffusionPipeline): .sample(seeds, ...), .restore(images, ...), .encode / .decode, .save, and
    the sigma range, shapes and conditioners as attributes. See docs/api.md."""
    from .config.pipeline import load as _load  # imported on use: `import torchdiffusion` stays light
    return _load(path, device=device, ema=ema)


def __getattr__(name: str):
    if name == "DiffusionPipeline":
        from .config.pipeline import DiffusionPipeline
        return DiffusionPipeline
    raise AttributeError(f"module 'torchdiffusion' has no attribute {name!r}")
