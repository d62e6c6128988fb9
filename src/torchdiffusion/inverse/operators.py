"""Linear measurement operators A and Gaussian measurement noise: y = A x + sigma_y * e, e ~ N(0, I).

Notation: x has shape (B, *S) with S the per-sample shape (C, H, W) for images; the operators never assume
pixels: spatial operators act on the last two axes and channel operators on axis 1, so latents (B, C, h, w)
and video (B, C, T, H, W) go through the same code. Every operator is linear and provides

    A(x)          forward, (B, *S) -> (B, *S_y)
    A.adjoint(y)  A^T, with <A x, y> == <x, A^T y> for the flat inner product of each sample
    A.pinv(y)     the Moore-Penrose pseudo-inverse A^+ = A^T (A A^T)^{-1} where it exists, so A(A.pinv(y)) == y
                  for every y in the range of A (all y when A is onto)

and two facts that methods use: `exact_pinv` (False when `pinv` is a regularised inverse) and `gram` (lambda with
A A^T = lambda I on the range of A, or None when A A^T is not a multiple of the identity there).

| operator       | A x                                   | A^T y                        | A^+ y                  | gram  |
|----------------|---------------------------------------|------------------------------|------------------------|-------|
| Inpaint(m)     | m * x (m binary, 1 = observed)        | m * y                        | m * y                  | 1     |
| AvgPoolDown(f) | mean over f x f blocks                | nearest-up(y) / f^2          | nearest-up(y)          | 1/f^2 |
| BicubicDown(f) | antialiased bicubic resize by 1/f     | vector-Jacobian product      | A^T (A A^T)^{-1} y, CG | None  |
| GaussianBlur   | zero-padded 'same' convolution        | A (the kernel is symmetric)  | damped: A (A A + eps)^-1 | None |
| Colorize       | channel mean (C -> 1)                 | y / C on every channel       | y on every channel     | 1/C   |

Inpainting is written with the mask as a diagonal projection (the measurement keeps the image's shape with
zeros where nothing is observed), so A = A^T = A^+ and A A^T = I on the range. Masks: `box_mask`, `random_mask`,
`half_mask` (Lugmayr et al. 2022 and Chung et al. 2023 use the same three families).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Generators
from ..sampling.noise import randn_like


class OperatorError(ConfigError, ValueError):
    """An operator or measurement does not fit the data it is applied to (also a ValueError)."""


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t) + ")"


def _flat_spatial(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(B, ..., H, W) -> (N, 1, H, W) for the 2-D resampling kernels; returns the leading shape to undo it."""
    lead = tuple(x.shape[:-2])
    return x.reshape(-1, 1, x.shape[-2], x.shape[-1]), lead


def _unflat(x: Tensor, lead: tuple[int, ...]) -> Tensor:
    return x.reshape(*lead, x.shape[-2], x.shape[-1])


class Operator:
    """Base class of the linear operators; subclasses implement `_forward`, `_adjoint` and (where it exists)
    `_pinv` on tensors whose shape was checked."""

    name = "operator"
    exact_pinv = True
    gram: float | None = None

    def check(self, x: Tensor) -> None:
        """Raise OperatorError (one line naming both shapes) if x (B, ...) cannot be measured."""

    def check_measurement(self, y: Tensor, x_shape: Sequence[int]) -> None:
        """Raise OperatorError unless y has the shape A gives an input of shape x_shape (B, ...)."""
        want = self.output_shape(x_shape)
        if tuple(y.shape) != tuple(want):
            raise OperatorError(f"{self.name}: measurement of shape {_shape(y.shape)} does not match images of "
                                f"shape {_shape(x_shape)}, which measure to {_shape(want)}")

    def output_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        out = self(torch.zeros((1, *tuple(x_shape)[1:])))
        return (int(x_shape[0]), *out.shape[1:])

    def __call__(self, x: Tensor) -> Tensor:
        self.check(x)
        return self._forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self._adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        return self._pinv(y)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """The closest point to x (in the Euclidean norm when `exact_pinv`) with A x' = y: x + A^+ (y - A x)."""
        return x + self.pinv(y - self(x))

    # subclasses
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _pinv(self, y: Tensor) -> Tensor:
        raise OperatorError(f"{self.name} has no pseudo-inverse; use a method that needs only A and A^T (dps)")


# --------------------------------------------------------------------------------------------- inpainting
def _check_hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise OperatorError(f"mask size must be positive, got {h}x{w}")
    return int(h), int(w)


def box_mask(size: int | tuple[int, int], box: tuple[int, int, int, int] | None = None) -> Tensor:
    """(H, W) float mask, 1 = observed, with the box (top, left, height, width) missing; default: the centred
    box of half the height and width."""
    h, w = _check_hw(size)
    top, left, bh, bw = box if box is not None else (h // 4, w // 4, h // 2, w // 2)
    if not (0 <= top and 0 <= left and bh > 0 and bw > 0 and top + bh <= h and left + bw <= w):
        raise OperatorError(f"box (top={top}, left={left}, height={bh}, width={bw}) does not fit a {h}x{w} image")
    m = torch.ones(h, w)
    m[top:top + bh, left:left + bw] = 0
    return m


def random_mask(size: int | tuple[int, int], missing: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """(H, W) float mask with each pixel missing independently with probability `missing`."""
    h, w = _check_hw(size)
    if not 0.0 <= missing <= 1.0:
        raise OperatorError(f"the missing fraction of a random mask must be in [0, 1], got {missing}")
    return (torch.rand(h, w, generator=generator) >= missing).float()


HALVES = ("bottom", "top", "left", "right")


def half_mask(size: int | tuple[int, int], missing: str = "bottom") -> Tensor:
    """(H, W) float mask with one half missing: bottom, top, left or right."""
    h, w = _check_hw(size)
    m = torch.ones(h, w)
    if missing == "bottom":
        m[h // 2:] = 0
    elif missing == "top":
        m[:(h + 1) // 2] = 0
    elif missing == "left":
        m[:, :(w + 1) // 2] = 0
    elif missing == "right":
        m[:, w // 2:] = 0
    else:
        raise OperatorError(f"unknown half {missing!r}; valid: {', '.join(HALVES)}")
    return m


class Inpaint(Operator):
    """A x = m * x with a binary mask m (1 = observed) broadcastable to the per-sample shape by its trailing axes:
    (H, W) for every channel, (C, H, W) per channel, (C, T, H, W) for video."""

    name = "inpaint"
    gram = 1.0

    def __init__(self, mask: Tensor):
        mask = torch.as_tensor(mask)
        if mask.ndim < 2:
            raise OperatorError(f"an inpainting mask needs at least 2 axes (H, W), got shape {_shape(mask.shape)}")
        if not mask.is_floating_point() and mask.dtype != torch.bool:
            mask = mask.float()
        m = mask.float()
        if not bool(((m == 0) | (m == 1)).all()):
            bad = m[(m != 0) & (m != 1)].flatten()[0].item()
            raise OperatorError(f"an inpainting mask must be binary (0 = missing, 1 = observed); mask of shape "
                                f"{_shape(mask.shape)} holds {bad:g}")
        self.mask = m

    def check(self, x: Tensor) -> None:
        k = self.mask.ndim
        if x.ndim < k + 1 or any(a not in (1, b) for a, b in zip(self.mask.shape, x.shape[-k:])):
            raise OperatorError(f"inpainting mask of shape {_shape(self.mask.shape)} does not fit images of shape "
                                f"{_shape(x.shape)}; it must match their trailing axes (e.g. (H, W))")

    def output_shape(self, x_shape):
        return tuple(int(s) for s in x_shape)

    def _m(self, t: Tensor) -> Tensor:
        return self.mask.to(device=t.device, dtype=t.dtype)

    def _forward(self, x):
        return x * self._m(x)

    def _adjoint(self, y):
        return y * self._m(y)

    def _pinv(self, y):
        return y * self._m(y)


# --------------------------------------------------------------------------------------------- resolution
def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise OperatorError(f"the down-sampling factor must be an integer >= 1, got {factor!r}")
    return factor


class _Down(Operator):
    def __init__(self, factor: int):
        self.factor = _check_factor(factor)

    def check(self, x: Tensor) -> None:
        f = self.factor
        if x.ndim < 3 or x.shape[-1] % f or x.shape[-2] % f:
            raise OperatorError(f"{self.name}: factor {f} does not divide images of shape {_shape(x.shape)} "
                                f"(H and W, the last two axes, must be multiples of {f})")

    def output_shape(self, x_shape):
        s = tuple(int(v) for v in x_shape)
        return (*s[:-2], s[-2] // self.factor, s[-1] // self.factor)

    def check_measurement(self, y: Tensor, x_shape) -> None:
        f = self.factor
        s = tuple(int(v) for v in x_shape)
        if len(s) < 3 or s[-1] % f or s[-2] % f:
            raise OperatorError(f"{self.name}: factor {f} does not divide images of shape {_shape(s)}")
        super().check_measurement(y, x_shape)


class AvgPoolDown(_Down):
    """Average over non-overlapping f x f blocks of the last two axes; A A^T = I / f^2, so A^+ = f^2 A^T is
    nearest-neighbour up-sampling."""

    name = "avgpool"

    def __init__(self, factor: int):
        super().__init__(factor)
        self.gram = 1.0 / (self.factor * self.factor)

    def _forward(self, x):
        z, lead = _flat_spatial(x)
        return _unflat(F.avg_pool2d(z, self.factor), lead)

    def _up(self, y):
        z, lead = _flat_spatial(y)
        return _unflat(F.interpolate(z, scale_factor=self.factor, mode="nearest"), lead)

    def _adjoint(self, y):
        return self._up(y) * self.gram

    def _pinv(self, y):
        return self._up(y)


def conjugate_gradient(apply, b: Tensor, iters: int = 100, tol: float = 1e-10) -> Tensor:
    """Solve apply(u) = b for a symmetric positive (semi-)definite linear map, per batch row (B, ...).
    Stops when every row's residual norm is below tol * ||b||."""
    dims = tuple(range(1, b.ndim))
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(dims, keepdim=True)
    target = tol * tol * rr.clamp_min(1e-300)
    for _ in range(iters):
        if bool((rr <= target).all()):
            break
        ap = apply(p)
        alpha = rr / (p * ap).sum(dims, keepdim=True).clamp_min(1e-300)
        u = u + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(dims, keepdim=True)
        p = r + (rr_new / rr.clamp_min(1e-300)) * p
        rr = rr_new
    return u


def _vjp(fn, x_like: Tensor, y: Tensor) -> Tensor:
    """A^T y for a linear fn by a vector-Jacobian product at 0 (exact for a linear map)."""
    with torch.enable_grad():
        z = torch.zeros_like(x_like, requires_grad=True)
        (g,) = torch.autograd.grad(fn(z), z, grad_outputs=y)
    return g


class BicubicDown(_Down):
    """Antialiased bicubic resize by 1/f of the last two axes (the kernel of PIL's / MATLAB's imresize, which
    the super-resolution literature uses to make low-resolution inputs). A^T by a vector-Jacobian product;
    A^+ by conjugate gradients on A A^T (well conditioned for these kernels)."""

    name = "bicubic"

    def __init__(self, factor: int, cg_iters: int = 200):
        super().__init__(factor)
        self.cg_iters = cg_iters

    def _forward(self, x):
        z, lead = _flat_spatial(x)
        h, w = z.shape[-2] // self.factor, z.shape[-1] // self.factor
        return _unflat(F.interpolate(z, size=(h, w), mode="bicubic", antialias=True, align_corners=False), lead)

    def _adjoint(self, y):
        shape = (*y.shape[:-2], y.shape[-2] * self.factor, y.shape[-1] * self.factor)
        return _vjp(self._forward, y.new_zeros(shape), y)

    def _pinv(self, y):
        tol = 1e-12 if y.dtype == torch.float64 else 1e-6
        u = conjugate_gradient(lambda v: self._forward(self._adjoint(v)), y, self.cg_iters, tol)
        return self._adjoint(u)


# --------------------------------------------------------------------------------------------- blur
class GaussianBlur(Operator):
    """Convolution of the last two axes with a normalised Gaussian kernel of std `sigma` pixels, size
    2 * ceil(3 sigma) + 1 unless given, zero padding ('same' output). The kernel is symmetric, so A^T = A.
    A blur is not stably invertible; `pinv` is the damped inverse A (A A + eps I)^{-1} y (Tikhonov), which
    satisfies A(pinv(y)) == y only as eps -> 0 (exact_pinv is False)."""

    name = "blur"
    exact_pinv = False

    def __init__(self, sigma: float, kernel_size: int | None = None, eps: float = 1e-3, cg_iters: int = 100):
        if not (math.isfinite(sigma) and sigma > 0):
            raise OperatorError(f"the blur sigma must be a positive number of pixels, got {sigma!r}")
        k = kernel_size if kernel_size is not None else 2 * math.ceil(3 * sigma) + 1
        if k < 1 or k % 2 == 0:
            raise OperatorError(f"the blur kernel size must be odd and >= 1, got {k}")
        t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        self.kernel1d = g / g.sum()
        self.sigma, self.size, self.eps, self.cg_iters = float(sigma), k, float(eps), cg_iters

    def check(self, x: Tensor) -> None:
        if x.ndim < 3:
            raise OperatorError(f"blur needs images (B, ..., H, W), got shape {_shape(x.shape)}")

    def output_shape(self, x_shape):
        return tuple(int(s) for s in x_shape)

    def _forward(self, x):
        z, lead = _flat_spatial(x)
        g = self.kernel1d.to(device=x.device, dtype=x.dtype)
        p = self.size // 2
        z = F.conv2d(z, g.view(1, 1, 1, -1), padding=(0, p))  # rows
        z = F.conv2d(z, g.view(1, 1, -1, 1), padding=(p, 0))  # columns
        return _unflat(z, lead)

    def _adjoint(self, y):
        return self._forward(y)

    def _pinv(self, y):
        u = conjugate_gradient(lambda v: self._forward(self._forward(v)) + self.eps * v, y, self.cg_iters, 1e-8)
        return self._forward(u)


# --------------------------------------------------------------------------------------------- colour
class Colorize(Operator):
    """A x = mean over the channel axis (axis 1), keeping it: (B, C, ...) -> (B, 1, ...). A A^T = I / C, so
    A^+ y copies y to every channel."""

    name = "colorize"

    def __init__(self, channels: int = 3):
        if channels < 2:
            raise OperatorError(f"colourisation needs images with at least 2 channels, got {channels}")
        self.channels = int(channels)
        self.gram = 1.0 / self.channels

    def check(self, x: Tensor) -> None:
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise OperatorError(f"colorize for {self.channels}-channel images does not fit images of shape "
                                f"{_shape(x.shape)} (channels on axis 1)")

    def output_shape(self, x_shape):
        s = tuple(int(v) for v in x_shape)
        return (s[0], 1, *s[2:])

    def _forward(self, x):
        return x.mean(dim=1, keepdim=True)

    def _adjoint(self, y):
        return y.expand(y.shape[0], self.channels, *y.shape[2:]) / self.channels

    def _pinv(self, y):
        return y.expand(y.shape[0], self.channels, *y.shape[2:]).clone()


# --------------------------------------------------------------------------------------------- noise
@dataclass(frozen=True)
class GaussianNoise:
    """Measurement noise y = A x + std * e, e ~ N(0, I); std in the model's data range ([-1, 1] for images)."""

    std: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.std) and self.std >= 0):
            raise OperatorError(f"the measurement noise std must be a finite number >= 0, got {self.std!r}")

    def __call__(self, y: Tensor, generator: Generators = None) -> Tensor:
        return y if self.std == 0 else y + self.std * randn_like(y, generator)


def measure(op: Operator, x: Tensor, noise: GaussianNoise = GaussianNoise(), generator: Generators = None) -> Tensor:
    """y = A x + noise; with a list of B generators each row's noise depends on its own generator only."""
    return noise(op(x), generator)
