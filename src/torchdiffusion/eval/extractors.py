"""Feature extractors: the one protocol every metric's feature network follows, and the non-Inception ones.

A FeatureExtractor maps uint8 images (N, C, H, W) to float64 features (N, D) and carries what a result
must record to be reproducible: `name` (which network), `sha256` (of its weights file), `resize` (the
preprocessing). Extractors with class logits (for an Inception Score) also have `logits(images)`.

    InceptionFeatures   the TF FID Inception-v3 pool3 (eval.inception); no logits
    LogitsNetwork       a user-supplied TorchScript file returning logits (the standard IS needs the
                        TF Inception with its 1008-way head, which cannot be had offline)
    ClassifierFeatures  a classifier trained by the project on the data set (G's `train-classifier`):
                        penultimate features for a "classifier FID", logits for a "classifier IS";
                        every result that uses it is labelled as such (name starts with "classifier")

Plugging in another network is one object with these attributes; see `check_extractor`.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from torchdiffusion.errors import CheckpointError, DataError
from torchdiffusion.eval.inception import file_sha256, preprocess


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    sha256: str
    resize: str

    def __call__(self, images) -> np.ndarray:  # uint8 (N, C, H, W) -> float64 (N, D)
        ...


def check_extractor(extractor) -> None:
    """A one-line error when an object does not follow the FeatureExtractor protocol."""
    missing = [a for a in ("name", "sha256", "resize") if not isinstance(getattr(extractor, a, None), str)]
    if missing or not callable(extractor):
        raise DataError(f"{type(extractor).__name__} is not a feature extractor: it needs string attributes "
                        f"name, sha256, resize and __call__(uint8 images) -> (N, D) features (missing: "
                        f"{', '.join(missing) or '__call__'})")


def is_classifier_metric(extractor) -> bool:
    """True when results from this extractor must be labelled 'classifier FID / IS' rather than FID / IS."""
    return str(getattr(extractor, "name", "")).startswith("classifier")


def _uint8(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise DataError(f"feature extractors take uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


class LogitsNetwork:
    """A local TorchScript network on the FID preprocessing (TF convention x/128 - 1, TF1 bilinear 299x299,
    gray repeated to RGB) that returns class logits (N, C), e.g. the TF Inception-v3 with its 1008-way head
    exported by the user. Used for the standard Inception Score; never downloaded."""

    resize = "tf1-bilinear-299"

    def __init__(self, path: str | Path, *, batch_size: int = 50, device: str | torch.device = "cpu",
                 option: str = "--is-weights PATH"):
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"Inception Score weights not found at '{p}': {option} must name a local "
                                  f"TorchScript file that returns class logits (none ships offline)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:  # torch raises many kinds for a bad archive
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"'{p}' is not a TorchScript file ({reason[:120]}); {option} must name one "
                                  f"that returns class logits") from None
        self.path, self.batch_size, self.device = p, int(batch_size), torch.device(device)
        self.net = net.eval().to(self.device)
        self.name = f"logits:{p.name}"
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def logits(self, images) -> np.ndarray:
        x = _uint8(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                z = self.net(preprocess(x[start:start + self.batch_size]).to(self.device))
                if z.dim() != 2:
                    raise CheckpointError(f"'{self.path}' returns shape {tuple(z.shape)}; logits (N, C) expected")
                out.append(z.to("cpu", torch.float64).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    __call__ = logits


class ClassifierFeatures:
    """Features and logits of a classifier trained on the data set, as a FeatureExtractor.

    `module(x, sigma=None) -> logits` and `module.features(x, sigma=None) -> (B, F)` with x in the model
    range [-1, 1] (x = u8 / 127.5 - 1), the interface of `config.loaders.load_classifier`. No resize:
    the classifier sees images at the data set's resolution. sigma is None (clean images)."""

    resize = "none"

    def __init__(self, module: torch.nn.Module, *, name: str = "classifier", sha256: str = "",
                 batch_size: int = 256, device: str | torch.device = "cpu"):
        if not callable(getattr(module, "features", None)):
            raise DataError("a classifier for classifier FID/IS needs a .features(x, sigma=None) method")
        self.module = module.eval()
        self.name = name if name.startswith("classifier") else f"classifier:{name}"
        self.sha256 = sha256 or _state_sha256(module)
        self.batch_size, self.device = int(batch_size), torch.device(device)

    def _run(self, images, fn: Callable) -> np.ndarray:
        x = _uint8(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                xb = x[start:start + self.batch_size].to(self.device, torch.float32) / 127.5 - 1.0
                out.append(fn(xb).flatten(1).to("cpu", torch.float64).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def __call__(self, images) -> np.ndarray:
        return self._run(images, lambda x: self.module.features(x, None))

    def logits(self, images) -> np.ndarray:
        return self._run(images, lambda x: self.module(x, None))


def _state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) when no file hash is at hand."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
