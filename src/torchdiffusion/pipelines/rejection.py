"""Rejection sampling by condition estimation: keep a sample only if a classifier recovers its condition from it.

Notation: N requested samples with target labels y_i and seeds s_i; a classifier gives p(k | x) for a finished
sample x (model range [-1, 1]); threshold tau in [0, 1].

A sample is accepted when argmax_k p(k | x) = y_i and p(y_i | x) >= tau. Rejected samples are generated again
from new seeds (retry_seed(s_i, attempt), a hash, so every final image is reproducible from the recorded seed)
while the budget of extra generations lasts; each round regenerates all still-rejected samples that fit into
what is left of the budget, lowest index first. A sample that is never accepted keeps the attempt with the
highest p(y_i | x).

Reported: acceptance rate = accepted generations / all generations; final accuracy = fraction of the N returned
samples whose classifier estimate equals the target (the rejection classifier's view; an independent judge
classifier gives the honest number, see bench/guidance_bench.py).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

#: generate(seeds, labels) -> samples (B, ...) in model range (float) or uint8 images
GenerateFn = Callable[[Sequence[int], Tensor], Tensor]
#: classify(samples) -> probabilities (B, K)
ClassifyFn = Callable[[Tensor], Tensor]


def retry_seed(seed: int, attempt: int) -> int:
    """Seed of the attempt-th regeneration (attempt >= 1) of the sample first drawn with `seed`: 31 bits of
    sha256 over (seed, attempt), so retries do not collide with the small seeds users request."""
    if attempt == 0:
        return int(seed)
    digest = hashlib.sha256(b"reject" + struct.pack("<qq", int(seed), int(attempt))).digest()
    return int.from_bytes(digest[:4], "little") & (2**31 - 1)


@dataclass
class RejectionResult:
    samples: Tensor  # (N, ...) the returned samples
    seeds: list[int]  # the seed that produced each returned sample
    attempts: list[int]  # generations spent on each sample (1 = accepted at once or budget exhausted)
    accepted: Tensor  # bool (N,)
    confidence: Tensor  # (N,) p(y_i | returned sample)
    predicted: Tensor  # int64 (N,) the classifier's estimate of each returned sample
    generated: int  # total generations, N + extra
    history: list[dict] = field(default_factory=list)  # per round: {"round", "generated", "accepted"}

    @property
    def acceptance_rate(self) -> float:
        return sum(h["accepted"] for h in self.history) / max(self.generated, 1)

    @property
    def final_accuracy(self) -> float:
        return float(self.accepted.float().mean()) if self.accepted.numel() else 0.0

    def summary(self) -> dict:
        return {"count": len(self.seeds), "generated": self.generated, "extra": self.generated - len(self.seeds),
                "acceptance_rate": round(self.acceptance_rate, 4), "final_accuracy": round(self.final_accuracy, 4),
                "accepted": int(self.accepted.sum()), "rounds": len(self.history)}


def _judge(classify: ClassifyFn, x: Tensor, y: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    p = classify(x)
    pred = p.argmax(1)
    conf = p.gather(1, y.reshape(-1, 1)).squeeze(1)
    return (pred == y) & (conf >= threshold), conf, pred


def rejection_sample(generate: GenerateFn, classify: ClassifyFn, seeds: Sequence[int], labels: Tensor, *,
                     threshold: float = 0.0, budget: int | None = None, max_rounds: int = 100) -> RejectionResult:
    """Generate one sample per (seed, label), regenerate rejected ones within `budget` extra generations
    (default N: at most twice the cost); see the module docstring."""
    n = len(seeds)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.shape != (n,):
        raise ConfigError(f"rejection sampling needs one label per seed: {n} seeds, {labels.numel()} labels")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--reject-threshold must be in [0, 1], got {threshold}")
    budget = n if budget is None else int(budget)
    if budget < 0:
        raise ConfigError(f"--reject-budget must be >= 0 (extra generations), got {budget}")
    samples = generate(list(seeds), labels)
    ok, conf, pred = _judge(classify, samples, labels, threshold)
    final_seeds, attempts = [int(s) for s in seeds], [1] * n
    history = [{"round": 0, "generated": n, "accepted": int(ok.sum())}]
    generated, left = n, budget
    for rnd in range(1, max_rounds + 1):
        todo = [i for i in range(n) if not ok[i]][:left]
        if not todo:
            break
        new_seeds = [retry_seed(seeds[i], attempts[i]) for i in todo]
        idx = torch.tensor(todo)
        new = generate(new_seeds, labels[idx])
        new_ok, new_conf, new_pred = _judge(classify, new, labels[idx], threshold)
        generated += len(todo)
        left -= len(todo)
        for j, i in enumerate(todo):
            attempts[i] += 1
            if bool(new_ok[j]) or float(new_conf[j]) > float(conf[i]):  # keep the most confident attempt
                samples[i], conf[i], pred[i], ok[i] = new[j], new_conf[j], new_pred[j], new_ok[j]
                final_seeds[i] = new_seeds[j]
        history.append({"round": rnd, "generated": len(todo), "accepted": int(new_ok.sum())})
    return RejectionResult(samples, final_seeds, attempts, ok, conf, pred, generated, history)
