"""Perceptual distances for first-stage training: LPIPS on VGG16 (Zhang et al. 2018) from a user-supplied weights
file, or the same construction on the features of a classifier the project trained on the same data ("classifier-
perceptual": no learned heads; offline, no VGG weights ship in any package here).

Notation: x, y (B, C, H, W) in [-1, 1]; phi_l (B, C_l, H_l, W_l) the feature maps of layer l; u(f) = f / (||f||_C +
1e-10) the unit-normalised features along channels; w_l (C_l,) LPIPS's non-negative linear heads.

    LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc (u(phi_l(x)) - u(phi_l(y)))^2_c            (B,)
                  phi: VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input scaled by LPIPS's
                  (x - shift) / scale; grey images are repeated to three channels
    classifier-perceptual(x, y) = mean_l mean_{h,w} mean_c (u(phi_l(x)) - u(phi_l(y)))^2_c   (B,)
                  phi: the classifier's feature map after every resolution level and after its middle block

LPIPS weights file: safetensors, or a state dict read with torch.load(weights_only=True) (never a pickle of
code), holding the 13 VGG16 convolutions under torchvision's names (features.<i>.weight / .bias) or the lpips
package's (net.slice<k>.<i>.weight / .bias), and the five heads as lin<l>.model.1.weight or lin<l>.weight.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's features numbering
_WIDTHS = (64, 128, 256, 512, 512)


def _unit(f: Tensor) -> Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance (B,) of two image batches in [-1, 1]; frozen (eval mode, no gradients to its weights)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers[:_TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """The network with the weights of an LPIPS-VGG16 file (module docstring); one-line ConfigError otherwise."""
        path = Path(path)
        where = f"loss.perceptual_path {path}"
        if not path.is_file():
            raise ConfigError(f"{where}: no such file (an LPIPS-VGG16 weights file: safetensors or a torch state "
                              f"dict)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                raw = load_file(str(path))
            else:
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any reader failure is the file's fault: say so in one line
            raise ConfigError(f"{where}: not a readable weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
        if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
            raise ConfigError(f"{where}: expected a state dict of tensors")
        m = cls()
        state = {}
        for k, v in raw.items():
            parts = k.split(".")
            if parts[0] == "features" and len(parts) == 3:
                state[k] = v
            elif parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
                state[f"features.{parts[2]}.{parts[3]}"] = v
            elif parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
                state[f"lins.{parts[0][3:]}.weight"] = v
        want = {k for k in m.state_dict() if k not in ("shift", "scale")}
        missing = sorted(want - set(state))
        if missing:
            raise ConfigError(f"{where}: missing {len(missing)} LPIPS-VGG16 tensors (e.g. {missing[0]}); the file "
                              f"needs the VGG16 convolutions and the five linear heads")
        try:
            m.load_state_dict({k: state[k] for k in want}, strict=False)
        except RuntimeError as e:
            raise ConfigError(f"{where}: tensors of the wrong shape ({str(e).strip().splitlines()[-1].strip()})") \
                from None
        return m

    def _taps(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        d = 0.0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            d = d + lin((_unit(fx) - _unit(fy)).pow(2)).mean(dim=(1, 2, 3))
        return d


class ClassifierPerceptual(nn.Module):
    """classifier-perceptual distance (B,) on a project classifier's (nn.classifier.Classifier) feature maps."""

    label = "classifier-perceptual"

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self._maps: list[Tensor] = []
        for m in list(classifier.down) + [classifier.mid]:
            m.register_forward_hook(lambda mod, inp, out: self._maps.append(out))

    def train(self, mode: bool = True):
        return super().train(False)

    def _features(self, x: Tensor) -> list[Tensor]:
        self._maps = []
        self.classifier.features(x)
        maps, self._maps = self._maps, []
        return maps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self._features(x), self._features(y)
        return sum((_unit(a) - _unit(b)).pow(2).mean(dim=(1, 2, 3)) for a, b in zip(fx, fy)) / len(fx)
