"""U-ViT (Bao et al. 2023, "All are worth words"): forward(x, c_noise, cond) -> (B, out_channels, *S).

Notation as in dit.py: x (B, C, *S), patch size p, token grid G = S / p with L tokens of width D.

Architecture (Bao et al. 2023, sec. 3 and fig. 1): everything is a token. The sequence is
    [context tokens (linear map of each context vector), one token per class/scalar/vector condition,
     the noise-level token MLP(emb(c_noise)), the L patch tokens]
with the E = N - L extra tokens first. Pre-LN transformer blocks run in three groups: (depth - 1) / 2 "in"
blocks whose outputs are kept, one middle block, and (depth - 1) / 2 "out" blocks, each of which first joins the
matching in-block output through a long skip, t = Linear(concat(t, skip)) (the paper's best variant, sec. 3.1).
Then LayerNorm, a linear map to p^n * out_channels per token, the extra tokens dropped, unpatchify, and a final
3x3 convolution (sec. 3.1: it improves sample quality). The final convolution is zero-initialised here, so the
network starts at output 0 like the other backbones of this library. Positional encoding `pos` (posenc.py)
acts on the patch tokens only: the absolute sin-cos table is added to them (the extra tokens are told apart by
their content), RoPE rotates only them and the relative bias is 0 on rows and columns of extra tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.dit import (CondPlan, Mlp, TokenSelfAttention, check_cond, embedding_for, grid_of,
                                   make_positions, patchify, unpatchify)
from torchdiffusion.nn.embedding import PositionalEmbedding
from torchdiffusion.nn.posenc import check_pos
from torchdiffusion.nn.resblock import conv_nd


@dataclass(frozen=True)
class UViTConfig:
    """U-ViT settings (`model.backbone: {kind: uvit, ...}`); sizes, channels and conditions come from the data
    and the conditioners. Defaults suit 28-32 px: width 256, 7 blocks, 4 heads, patch 2 (U-ViT-S is width 512,
    13 blocks, 8 heads: Bao et al. 2023, Table 1)."""

    patch_size: int = 2
    width: int = 256
    depth: int = 7                                          # odd: (depth - 1) / 2 in, 1 middle, (depth - 1) / 2 out
    heads: int = 4
    mlp_ratio: float = 4.0                                  # Bao et al. 2023
    pos: Literal["absolute", "rope", "relbias"] = "absolute"  # posenc.py; U-ViT uses an absolute embedding
    rope_base: float = 100.0                                # Heo et al. 2024
    rel_buckets: int = 32                                   # Raffel et al. 2020
    rel_max_distance: int = 128                             # Raffel et al. 2020

    def __post_init__(self):
        check_pos(self.pos, "UViTConfig.pos")
        for name in ("patch_size", "width", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"UViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 1 or self.depth % 2 == 0:
            raise ConfigError(f"UViTConfig.depth must be odd (in blocks, a middle block, out blocks), e.g. 7 or 13; "
                              f"got {self.depth}")
        if self.width % self.heads:
            raise ConfigError(f"UViTConfig.heads={self.heads} must divide width={self.width}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"UViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")


class UViTBlock(nn.Module):
    """[t = Linear(concat(t, skip))]; t + Attn(LN(t)); t + MLP(LN(t)) (pre-LN ViT block, Bao et al. 2023)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, t: Tensor, skip: Optional[Tensor] = None, rope=None, bias=None) -> Tensor:
        if self.skip is not None:
            t = self.skip(torch.cat([t, skip], dim=-1))
        t = t + self.attn(self.norm1(t), rope, bias)
        return t + self.mlp(self.norm2(t))


class UViT(nn.Module):
    """U-ViT for a protocols.BackboneIO; see the module docstring. The output starts at exactly 0."""

    def __init__(self, cfg: UViTConfig, io):
        super().__init__()
        if not isinstance(cfg, UViTConfig):
            raise ConfigError(f"UViT expects a UViTConfig, got {type(cfg).__name__}")
        self.cfg, self.io = cfg, io
        self.plan = plan = CondPlan.of(io, "uvit", max_context=len(io.conds))
        p, d = cfg.patch_size, cfg.width
        self.grid = grid_of(io.shape, p, "uvit")
        n = len(self.grid)
        self.in_channels = io.shape[0]
        self.patch_embed = nn.Linear((self.in_channels + plan.concat_channels) * p ** n, d)
        make_positions(self, cfg.pos, self.grid, d, cfg.heads, cfg)
        self.noise_embed = nn.Sequential(PositionalEmbedding(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.cond_embed = nn.ModuleDict({s.key: embedding_for(s, d) for s in plan.embedded})
        self.context_embed = nn.ModuleDict({s.key: nn.Linear(s.size, d) for s in plan.context})
        half = (cfg.depth - 1) // 2
        self.in_blocks = nn.ModuleList(UViTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(half))
        self.mid_block = UViTBlock(d, cfg.heads, cfg.mlp_ratio)
        self.out_blocks = nn.ModuleList(UViTBlock(d, cfg.heads, cfg.mlp_ratio, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, io.out_channels * p ** n)
        self.final_conv = conv_nd(n, io.out_channels, io.out_channels, 3)
        for m in self.modules():  # U-ViT's init: truncated N(0, 0.02) linears with zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(self.final_conv.weight)
        nn.init.zeros_(self.final_conv.bias)

    def extra_tokens(self, c_noise: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """(B, E, D): context tokens, one token per embedded condition, the noise-level token (module docstring)."""
        noise = self.noise_embed(c_noise)                                    # (B, D)
        toks = [net(cond[key].to(noise.dtype)) for key, net in self.context_embed.items()]  # (B, M, D) each
        for key, net in self.cond_embed.items():
            v = cond[key]
            toks.append(net(v if isinstance(net, nn.Embedding) else v.to(noise.dtype))[:, None, :])
        toks.append(noise[:, None, :])
        return torch.cat(toks, dim=1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """x (B, C, *S), c_noise (B,), cond (dit.py's notation) -> (B, out_channels, *S)."""
        cond = {} if cond is None else cond
        want = (self.in_channels, *(g * self.cfg.patch_size for g in self.grid))
        if tuple(x.shape[1:]) != want:
            raise TorchDiffusionError(f"UViT input x must be (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise TorchDiffusionError(f"c_noise must have shape (B,) = ({x.shape[0]},), got {tuple(c_noise.shape)}")
        check_cond(cond, self.io.conds, x, "UViT")
        if self.plan.concat:
            x = torch.cat([x] + [cond[s.key].to(x.dtype) for s in self.plan.concat], dim=1)
        t = self.patch_embed(patchify(x, self.cfg.patch_size))             # (B, L, D)
        if self.pos_embed is not None:
            t = t + self.pos_embed.to(t.dtype)
        extra = self.extra_tokens(c_noise, cond)                           # (B, E, D)
        e = extra.shape[1]
        t = torch.cat([extra.to(t.dtype), t], dim=1)                       # (B, E + L, D)
        bias = self.relbias(e) if self.relbias is not None else None      # (heads, E + L, E + L)
        skips = []
        for blk in self.in_blocks:
            t = blk(t, rope=self.rope, bias=bias)
            skips.append(t)
        t = self.mid_block(t, rope=self.rope, bias=bias)
        for blk in self.out_blocks:
            t = blk(t, skips.pop(), rope=self.rope, bias=bias)
        t = self.decoder(self.norm(t))[:, e:, :]                           # (B, L, out p^n)
        return self.final_conv(unpatchify(t, self.cfg.patch_size, self.grid))  # (B, out_channels, *S)


def build_uvit(cfg: UViTConfig, io) -> UViT:
    """The backbone-registry builder (protocols.BackboneIO gives shape, output channels and conditions)."""
    return UViT(cfg, io)
