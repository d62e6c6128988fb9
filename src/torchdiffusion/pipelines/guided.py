"""What `sample` generates with: the (guided) denoiser, the label of every seed and, with rejection, the
rejection loop (pipelines.rejection).

Guidance composes by wrapping (DESIGN 2.7): classifier-free guidance D_u + w (D_c - D_u) (Ho & Salimans 2022),
then classifier guidance D + s sigma^2 grad log p(y | x, sigma) (Dhariwal & Nichol 2021), each optionally only
for sigma in (lo, hi] (Kynkaanniemi et al. 2024). Labels are cycled over the seeds, so a seed keeps its label
at any batch size and in any process.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError


def _stderr(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr)


class GuidedSampling:
    """The plain `base` denoiser for an unconditional model without guidance options; else its guided wrapper.

    num_classes: of the model (0: unconditional). labels: requested labels (None: 0..K-1 for a class-conditional
    model or with a classifier); labels_text: how they were written, for the record. classifier: a noisy
    classifier for guidance (config.loaders.load_classifier) or None; judge: the classifier that judges samples
    for rejection. uncond: cond -> the null condition for classifier-free guidance (the run's
    Conditioning.null; default: the null label). log / warn: where the rejection summary and warnings go."""

    def __init__(self, num_classes: int, base, seed_list: Sequence[int], device, *,
                 labels: Optional[Sequence[int]] = None, labels_text: Optional[str] = None, guidance_scale=None,
                 interval: Optional[tuple[float, float]] = None, classifier=None, classifier_scale=1.0,
                 reject=False, judge=None, reject_threshold=0.0, reject_budget=None, uncond=None,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] = _stderr):
        from ..guidance.cfg import ClassifierFreeGuidance, null_label
        from ..guidance.classifier import ClassifierGuidance

        k_model = num_classes
        self.classifier, self.judge, self.log = classifier, judge, log
        if reject and judge is None:
            raise ConfigError("--reject needs a classifier to judge samples: --reject-classifier RUN or "
                              "--classifier RUN")
        k_clf = [m.cfg.num_classes for m in (self.classifier, self.judge) if m is not None]
        if k_model and any(k != k_model for k in k_clf):
            raise ConfigError(f"the model has {k_model} classes but the classifier has {k_clf[0]}")
        k = k_model or (k_clf[0] if k_clf else 0)
        if guidance_scale is not None and not k_model:
            raise ConfigError("--guidance-scale needs a class-conditional model (train with --set cond.label.kind=class); "
                              "for an unconditional model use --classifier RUN --classifier-scale S")
        if interval is not None and guidance_scale is None and self.classifier is None:
            raise ConfigError("--guidance-interval applies to --guidance-scale or --classifier guidance")
        if labels is not None and not k:
            raise ConfigError("--labels needs a class-conditional model or a --classifier; this model is "
                              "unconditional")
        bad = [v for v in labels or () if not 0 <= v < k]
        if bad:
            raise ConfigError(f"--labels {bad[0]} is out of range; this model/classifier has {k} classes "
                              f"(0-{k - 1})")
        label_list = list(labels) if labels is not None else (list(range(k)) if k else None)
        self.labels = ([label_list[i % len(label_list)] for i in range(len(seed_list))]
                       if label_list is not None and (k_model or self.classifier is not None or reject) else None)
        self.device = device
        self.label_of = dict(zip(seed_list, self.labels)) if self.labels is not None else {}
        denoiser = base  # the model, or a wrapper of it (e.g. an NFE counter)
        if k_model and guidance_scale is not None and guidance_scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, uncond or null_label(k_model),
                                              interval=interval)
        if self.classifier is not None:
            denoiser = ClassifierGuidance(denoiser, self.classifier, classifier_scale,
                                          denoiser_cond="same" if k_model else "none", interval=interval)
        self.denoiser = denoiser
        self.reject, self.reject_threshold, self.reject_budget = reject, reject_threshold, reject_budget
        self.result = None
        self.settings = {
            "labels": labels_text, "guidance_scale": guidance_scale if k_model else None,
            "guidance_interval": list(interval) if interval else None,
            "classifier": str(self.classifier.checkpoint_path) if self.classifier is not None else None,
            "classifier_noisy": self.classifier.noisy if self.classifier is not None else None,
            "classifier_scale": classifier_scale if self.classifier is not None else None,
        }
        if self.classifier is not None and not self.classifier.noisy:
            warn("warning: --classifier was trained on clean images only; guidance needs a noisy "
                 "classifier (train-classifier --noisy)")

    def cond_for(self, labels: Sequence[int]):
        """cond_for for generate(): the labels of consecutive chunks, in order."""
        if self.labels is None:
            return None
        pos = [0]

        def cond(chunk):
            out = torch.tensor(labels[pos[0]:pos[0] + len(chunk)], dtype=torch.int64, device=self.device)
            pos[0] += len(chunk)
            return {"label": out}

        return cond

    def generate(self, generate_fn, seeds: Sequence[int], shape, sampler, sigmas, *, batch, device, on_batch=None,
                 decode=None):
        """generate_fn is pipelines.generate.generate (same arguments, the guided denoiser and labels added)."""
        denoiser = self.denoiser
        labels = [self.label_of[s] for s in seeds] if self.labels is not None else None
        if not self.reject:
            return generate_fn(denoiser, seeds, shape, sampler, sigmas, batch=batch, device=device,
                               cond_for=self.cond_for(labels) if labels is not None else None, on_batch=on_batch,
                               decode=decode)
        from ..data.convert import to_model_range
        from .rejection import rejection_sample

        def gen(s, y):
            return generate_fn(denoiser, s, shape, sampler, sigmas, batch=batch, device=device,
                               cond_for=self.cond_for(y.tolist()), decode=decode)

        @torch.no_grad()
        def classify(images):
            return torch.softmax(self.judge(to_model_range(images).to(device)).float(), dim=1).cpu()

        self.result = rejection_sample(gen, classify, list(seeds), torch.tensor(labels),
                                       threshold=self.reject_threshold, budget=self.reject_budget)
        summ = self.result.summary()
        self.log(f"rejection: {summ['accepted']}/{summ['count']} accepted after {summ['generated']} generations "
                 f"(acceptance rate {summ['acceptance_rate']:.3f}, final accuracy {summ['final_accuracy']:.3f} by "
                 f"the judging classifier)")
        if on_batch is not None:
            on_batch(list(seeds), self.result.samples)
        return self.result.samples

    def record(self) -> dict:
        out = {k: v for k, v in self.settings.items() if v is not None}
        if self.labels is not None:
            out["label_per_seed"] = self.labels
        if self.result is not None:
            out["rejection"] = {**self.result.summary(), "threshold": self.reject_threshold,
                                "classifier": str(self.judge.checkpoint_path), "final_seeds": self.result.seeds,
                                "attempts": self.result.attempts}
        return out
