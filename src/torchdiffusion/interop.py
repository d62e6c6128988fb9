"""diffusers interop in one import: `torchdiffusion.interop.load_diffusers(folder)` and friends (docs/interop.md).

The implementation lives in config/interop.py (it assembles a model from a config, which is the config row's job);
this module only names it.
"""
from torchdiffusion.config.interop import (LoadedDiffusers, convert_diffusers, diffusers_start_noise,
                                           export_diffusers, load_diffusers, scheduler_sigmas)

__all__ = ["LoadedDiffusers", "convert_diffusers", "diffusers_start_noise", "export_diffusers", "load_diffusers",
           "scheduler_sigmas"]
