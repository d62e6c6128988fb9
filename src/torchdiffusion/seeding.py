"""Seed mixing: every per-step (or per-epoch) random stream of the project derives its generator seed here.

A stream is named by a tag (bytes) and a tuple of integers (seed, step, ...); its 63-bit generator seed is the
first 8 bytes (little-endian) of sha256(tag + the integers as signed little-endian int64), top bit cleared.
A hash rather than seed + step, so that (seed=1, step=0) and (seed=0, step=1) never share a stream.

Streams in use (each bit-identical to the release that introduced it):
    data order, epoch e          mix_seed(seed, e)                          (data.order, no tag)
    condition dropout, step k    mix_seed(seed, k, tag=b"cond-dropout")     (guidance.dropout)
    classifier training, step k  mix_seed(seed, k, tag=b"classifier")       (train.classifier)
    diffusion training noise     linear_step_seed(seed, k)                  (train.diffusion_step)
The last one predates the hash; it is kept so that diffusion runs (and their checkpoints) keep their noise.
This module is a leaf: it imports only the standard library and torch.
"""
from __future__ import annotations

import hashlib
import struct

import torch

_MASK63 = 2**63 - 1


def mix_seed(*values: int, tag: bytes = b"") -> int:
    """63-bit seed of the stream (tag, values): sha256 over tag + values packed as signed int64 ('<q')."""
    digest = hashlib.sha256(tag + struct.pack("<" + "q" * len(values), *(int(v) for v in values))).digest()
    return int.from_bytes(digest[:8], "little") & _MASK63


def linear_step_seed(seed: int, step: int) -> int:
    """Seed of the diffusion trainer's noise generator at global step `step` (a fixed 64-bit linear mix with
    SplitMix64 constants; kept for bit-compatibility with existing runs; new streams use mix_seed)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK63


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)
