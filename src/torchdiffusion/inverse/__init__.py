"""Inverse problems: linear measurement operators and solvers that restore x0 from y = A x0 + sigma_y e with an
unconditional denoiser (replacement/POCS, ILVR, CCDF, MCG, DPS, RePaint, reconstruction guidance); the
corrections run on any grid sampler (corrections.py)."""
from torchdiffusion.inverse.corrections import (ILVR, MCG, POCS, Correction, ReconstructionGuidance, Replacement,
                                                solve)
from torchdiffusion.inverse.gradients import MeasurementGradient, dps, reconstruction_guidance
from torchdiffusion.inverse.measurement import Measurement
from torchdiffusion.inverse.methods import (GRADIENT_METHODS, SAMPLER_METHODS, repaint_nfe, repaint_schedule, restore_ccdf,
                                            restore_dps, restore_ilvr, restore_mcg, restore_reconstruction,
                                            restore_repaint, restore_replacement)
from torchdiffusion.inverse.operators import (AvgPoolDown, BicubicDown, Colorize, GaussianBlur, GaussianNoise,
                                              Inpaint, Operator, OperatorError, box_mask, half_mask, measure,
                                              random_mask)

__all__ = ["Operator", "OperatorError", "Inpaint", "AvgPoolDown", "BicubicDown", "GaussianBlur", "Colorize",
           "GaussianNoise", "measure", "box_mask", "random_mask", "half_mask", "Measurement", "MeasurementGradient",
           "dps", "reconstruction_guidance", "restore_replacement", "restore_ilvr", "restore_ccdf", "restore_mcg",
           "restore_dps", "restore_repaint", "restore_reconstruction", "repaint_schedule", "repaint_nfe",
           "GRADIENT_METHODS", "SAMPLER_METHODS", "Correction", "Replacement", "POCS", "ILVR", "MCG",
           "ReconstructionGuidance", "solve"]
