"""Guidance: Denoiser -> Denoiser wrappers (classifier-free guidance, classifier guidance) and the condition
dropout that trains a model for classifier-free guidance."""
