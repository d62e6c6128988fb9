"""A bidirectional token transformer for discrete diffusion: forward(x, c_noise, cond) -> (B, *G, K) logits.

Notation: x (B, *G) int64 tokens on a grid G (a VQ latent grid (h, w), or (N,) for sequences) with values in
0..K (K the mask token of an absorbing process; every table has K + 1 rows so one network serves all three
processes of core.discrete); c_noise (B,) a real number per sample (core.discrete_objectives.TokenModel passes the step t); cond the
declared conditions (protocols.CondSpec): class (B,) int64 in [0, n] (n = null label), scalar (B,), vector (B, n).

Architecture: a token embedding table (K + 1, D) (MaskGIT, Chang et al. 2022, sec. 3; the mask is a learned
row), positions from nn.posenc (absolute sin-cos added once, or axial RoPE inside attention), `depth` DiT blocks
with adaLN-Zero conditioning on MLP(emb(c_noise)) + the class/scalar/vector embeddings (Peebles & Xie 2023; the
blocks of nn.dit), a final adaLN + linear map to K logits per token (zero-initialised, so the network starts at
the uniform distribution over the K classes). Attention is full (bidirectional); no causal mask.

BackboneIO: shape = (K, *G) (the classes play the role of channels: a token is a one-hot of K), out_channels = K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.dit import CondPlan, DiTBlock, FinalLayer, check_cond, embedding_for, make_positions
from torchdiffusion.nn.embedding import PositionalEmbedding
from torchdiffusion.nn.posenc import check_pos


@dataclass(frozen=True)
class TokenTransformerConfig:
    """`model.backbone: {kind: token_transformer, ...}`; K and the grid come from the first stage (BackboneIO)."""

    width: int = 256                                   # D
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    pos: Literal["absolute", "rope"] = "absolute"      # nn.posenc
    rope_base: float = 100.0
    rel_buckets: int = 32                              # unused (make_positions' signature)
    rel_max_distance: int = 128
    noise_freqs: int = 256

    def __post_init__(self):
        check_pos(self.pos, "TokenTransformerConfig.pos", ("absolute", "rope"))
        for name in ("width", "depth", "heads", "noise_freqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TokenTransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"TokenTransformerConfig.heads={self.heads} must divide width={self.width}")
        if self.noise_freqs % 2:
            raise ConfigError(f"TokenTransformerConfig.noise_freqs must be even, got {self.noise_freqs}")


class TokenTransformer(nn.Module):
    def __init__(self, cfg: TokenTransformerConfig, io):
        super().__init__()
        if not isinstance(cfg, TokenTransformerConfig):
            raise ConfigError(f"TokenTransformer expects a TokenTransformerConfig, got {type(cfg).__name__}")
        self.cfg, self.io = cfg, io
        self.num_classes = int(io.shape[0])
        self.grid = tuple(int(v) for v in io.shape[1:])
        if self.num_classes < 2 or not self.grid:
            raise ConfigError(f"token_transformer needs a shape (K, *grid) with K >= 2, got {tuple(io.shape)}")
        if io.out_channels != self.num_classes:
            raise ConfigError(f"token_transformer outputs K = {self.num_classes} logits, got out_channels "
                              f"{io.out_channels}")
        self.plan = plan = CondPlan.of(io, "token_transformer", max_context=0)
        if plan.concat:
            raise ConfigError("token_transformer takes class, scalar or vector conditions, not concat")
        d = cfg.width
        self.embed = nn.Embedding(self.num_classes + 1, d)
        make_positions(self, cfg.pos, self.grid, d, cfg.heads, cfg)
        self.noise_embed = PositionalEmbedding(cfg.noise_freqs)
        self.noise_mlp = nn.Sequential(nn.Linear(cfg.noise_freqs, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_embed = nn.ModuleDict({s.key: embedding_for(s, d) for s in plan.embedded})
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(d, self.num_classes)
        self.initialize()

    def initialize(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for lin in [self.final.modulation, self.final.linear] + [b.modulation for b in self.blocks]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """x (B, *G) int64 in 0..K, c_noise (B,) -> (B, *G, K) logits of x0."""
        cond = {} if cond is None else cond
        B = x.shape[0]
        if tuple(x.shape[1:]) != self.grid or x.is_floating_point():
            raise TorchDiffusionError(f"token_transformer input must be (B, {', '.join(map(str, self.grid))}) "
                                      f"int64 tokens, got {tuple(x.shape)} {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > self.num_classes):
            raise TorchDiffusionError(f"tokens out of range: found {int(x.min())}..{int(x.max())}, valid "
                                      f"0..{self.num_classes} ({self.num_classes} = mask)")
        if c_noise.shape != (B,):
            raise TorchDiffusionError(f"c_noise must have shape (B,) = ({B},), got {tuple(c_noise.shape)}")
        check_cond(cond, self.io.conds, x[:, None], "token_transformer")
        c = self.noise_mlp(self.noise_embed(c_noise))
        for key, net in self.cond_embed.items():
            v = cond[key]
            c = c + net(v if isinstance(net, nn.Embedding) else v.to(c.dtype))
        c = F.silu(c)
        t = self.embed(x.reshape(B, -1))                                   # (B, L, D)
        if self.pos_embed is not None:
            t = t + self.pos_embed.to(t.dtype)
        for blk in self.blocks:
            t = blk(t, c, None, self.rope, None)
        return self.final(t, c).reshape(B, *self.grid, self.num_classes)  # (B, *G, K)


def build_token_transformer(cfg: TokenTransformerConfig, io) -> TokenTransformer:
    return TokenTransformer(cfg, io)
