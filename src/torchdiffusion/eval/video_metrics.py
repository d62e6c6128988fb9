"""Video metrics: per-frame FID/KID, and a Frechet distance in the features of a small video network the project
trains on Moving MNIST ("FD-MMNIST-motion").

Notation: clips uint8 (N, C, T, H, W). Every result carries its protocol (clip length T, frame stride, N, the
feature network and its weights' sha256, the resize), so two numbers are comparable only when their protocols are.

- per-frame FID / KID: every frame of every clip is an image; any image FeatureExtractor (the FID Inception,
  eval.inception) gives (N T, D) features and eval.fid / eval.kid score them. It sees frames, not motion.
- FD-MMNIST-motion: the Frechet distance (eval.fid.frechet_distance) between the penultimate features (D = 32)
  of MotionNet, a 3-D convolutional network trained here on Moving MNIST to tell which digits a clip shows
  (10-way multi-label) and in which directions they move (8 sectors of 45 degrees, multi-label). Its features
  depend on the order of the frames, so it sees motion: shuffling the frames of real clips raises it. It is NOT
  the Frechet Video Distance of Unterthiner et al. 2018 (an I3D network trained on Kinetics) and every output
  names it FD-MMNIST-motion; its numbers are only comparable between runs that used the same weights (sha256).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import CheckpointError, DataError
from torchdiffusion.eval.fid import fid_from_features
from torchdiffusion.eval.kid import kid_from_features

MOTION_METRIC = "FD-MMNIST-motion"
DIRECTIONS = 8


def _clips(x, what: str = "clips") -> Tensor:
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 5:
        raise DataError(f"{what} must be uint8 (N, C, T, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


def frames_of(clips: Tensor) -> Tensor:
    """uint8 (N, C, T, H, W) -> (N T, C, H, W), clip-major."""
    n, c, t, h, w = clips.shape
    return clips.transpose(1, 2).reshape(n * t, c, h, w)


def protocol(real: Tensor, fake: Tensor, extractor, frame_stride: int = 1) -> dict:
    return {"clip_length": int(fake.shape[2]), "frame_stride": int(frame_stride), "n_real": int(real.shape[0]),
            "n_fake": int(fake.shape[0]), "size": list(fake.shape[3:]), "features": getattr(extractor, "name", "?"),
            "weights_sha256": getattr(extractor, "sha256", ""), "resize": getattr(extractor, "resize", "?")}


def fid_frames(real, fake, extractor, *, kid: bool = True, frame_stride: int = 1) -> dict:
    """Per-frame FID (and KID) of fake clips against real clips with an image extractor (module notes)."""
    real, fake = _clips(real, "real clips"), _clips(fake, "generated clips")
    fr, ff = extractor(frames_of(real)), extractor(frames_of(fake))
    out = {"fid_frames": float(fid_from_features(fr, ff)), "protocol": protocol(real, fake, extractor, frame_stride)}
    if kid:
        k = kid_from_features(fr, ff)
        out["kid_frames"] = float(k.mean)
    return out


class MotionNet(nn.Module):
    """(B, 1, T, H, W) in [-1, 1] -> features (B, 32); heads: digit logits (B, 10), direction logits (B, 8).
    Four 3-D convolutions (GroupNorm, SiLU; space halved three times, time once), max over space, mean over time."""

    def __init__(self, width: int = 16, features: int = 32):
        super().__init__()
        g = width // 4 if width >= 4 else 1
        self.body = nn.Sequential(
            nn.Conv3d(1, width, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(g, width), nn.SiLU(),
            nn.Conv3d(width, 2 * width, 3, padding=1), nn.GroupNorm(g, 2 * width), nn.SiLU(),
            nn.Conv3d(2 * width, 4 * width, 3, stride=(2, 2, 2), padding=1), nn.GroupNorm(g, 4 * width), nn.SiLU(),
            nn.Conv3d(4 * width, features, 3, stride=(1, 2, 2), padding=1), nn.SiLU())
        self.digit = nn.Linear(features, 10)
        self.direction = nn.Linear(features, DIRECTIONS)
        self.width, self.n_features = width, features

    def features(self, x: Tensor) -> Tensor:
        """Max over space (is a pattern anywhere in the frame), then mean over time."""
        return self.body(x).amax(dim=(3, 4)).mean(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.digit(f), self.direction(f)


def _targets(dataset, idx: Tensor) -> tuple[Tensor, Tensor]:
    digits, direction = dataset.extras["digits"][idx], dataset.extras["direction"][idx]
    t_digit = torch.zeros(len(idx), 10).scatter_(1, digits, 1.0)
    t_dir = torch.zeros(len(idx), DIRECTIONS).scatter_(1, direction, 1.0)
    return t_digit, t_dir


def train_motion_net(dataset, *, steps: int = 600, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                     width: int = 16) -> tuple[MotionNet, dict]:
    """MotionNet trained on a Moving MNIST set (its extras "digits" and "direction"), multi-label BCE on both
    heads, Adam; deterministic given seed. Returns (net in eval mode, record of how it was trained)."""
    if "digits" not in getattr(dataset, "extras", {}) or "direction" not in dataset.extras:
        raise DataError("the Moving MNIST feature network trains on Moving MNIST clips (data.kind=moving-mnist)")
    if dataset.channels != 1:
        raise DataError("MotionNet takes gray clips")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MotionNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch,), generator=g)
        x = dataset.x[idx].float() / 127.5 - 1
        t_digit, t_dir = _targets(dataset, idx)
        l_digit, l_dir = net(x)
        loss = F.binary_cross_entropy_with_logits(l_digit, t_digit) + F.binary_cross_entropy_with_logits(l_dir, t_dir)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "width": width, "final_loss": float(loss.detach()),
              "clip_shape": list(dataset.x.shape[1:]), "data": dict(dataset.info)}
    return net, record


@torch.no_grad()
def motion_accuracy(net: MotionNet, dataset, n: int = 512) -> dict:
    """Share of clips whose top-k digit / direction logits (k = digits per clip) are exactly the true sets."""
    idx = torch.arange(min(n, len(dataset)))
    l_digit, l_dir = net(dataset.x[idx].float() / 127.5 - 1)
    t_digit, t_dir = _targets(dataset, idx)
    out = {}
    for name, logits, target in (("digit", l_digit, t_digit), ("direction", l_dir, t_dir)):
        k = int(target.sum(1).max())
        pred = torch.zeros_like(target).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
        out[f"{name}_set_accuracy"] = float(((pred == target) | (target.sum(1, keepdim=True) < k)).all(1).float().mean())
    return out


def _state_sha256(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class MotionFeatures:
    """The FeatureExtractor of FD-MMNIST-motion: uint8 clips (N, 1, T, H, W) -> float64 (N, 32)."""

    net: MotionNet
    batch_size: int = 64
    name: str = MOTION_METRIC
    resize: str = "none"

    @property
    def sha256(self) -> str:
        return _state_sha256(self.net)

    @torch.no_grad()
    def __call__(self, clips) -> np.ndarray:
        clips = _clips(clips)
        out = [self.net.features(clips[s:s + self.batch_size].float() / 127.5 - 1).double().numpy()
               for s in range(0, len(clips), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.net.n_features))


def fd_motion(real, fake, features: MotionFeatures, *, frame_stride: int = 1) -> dict:
    """{"FD-MMNIST-motion": value, "protocol": {...}} of fake clips against real clips (module notes)."""
    real, fake = _clips(real, "real clips"), _clips(fake, "generated clips")
    if real.shape[1:] != fake.shape[1:]:
        raise DataError(f"{MOTION_METRIC}: real clips {tuple(real.shape[1:])} and generated clips "
                        f"{tuple(fake.shape[1:])} differ in shape (C, T, H, W); compare clips of one protocol")
    value = fid_from_features(features(real), features(fake))
    return {MOTION_METRIC: float(value), "protocol": protocol(real, fake, features, frame_stride)}


def save_motion_net(net: MotionNet, record: dict, path: Path) -> None:
    """path.safetensors (weights) + path.json (how it was trained, its sha256)."""
    from safetensors.torch import save_file
    path = Path(path)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({**record, "width": net.width, "sha256": _state_sha256(net),
                                                     "metric": MOTION_METRIC}, indent=1))


def load_motion_net(path: Path, sha256: Optional[str] = None) -> MotionNet:
    """The MotionNet saved by save_motion_net; sha256 (if given) must match the weights."""
    from safetensors.torch import load_file
    path = Path(path)
    w, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not w.is_file() or not meta.is_file():
        raise CheckpointError(f"{path}: {MOTION_METRIC} network not found (needs {w.name} and {meta.name})")
    rec = json.loads(meta.read_text())
    net = MotionNet(int(rec.get("width", 16)))
    net.load_state_dict(load_file(str(w)))
    net.eval()
    got = _state_sha256(net)
    if sha256 is not None and got != sha256:
        raise CheckpointError(f"{path}: weights sha256 {got[:16]}... differ from the expected {sha256[:16]}...")
    return net
