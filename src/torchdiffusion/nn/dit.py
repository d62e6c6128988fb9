"""DiT, the diffusion transformer (Peebles & Xie 2023): forward(x, c_noise, cond) -> (B, out_channels, *S).

Notation: x (B, C, *S) the network input (images S = (H, W), any H != W); p the patch size; the grid
G = S / p has L = prod(G) tokens of width D; c_noise (B,) a real number per sample; cond holds the declared
conditions (protocols.CondSpec): class (B,) int64 in [0, K] (K = null label), scalar (B,), vector (B, n),
concat (B, n, *S) (concatenated to x along channels), context (B, M, n) (cross-attention).

Architecture (Peebles & Xie 2023, sec. 3.2): patchify (a linear map of each p^d patch = a conv with kernel =
stride = p), N transformer blocks with adaLN-Zero, a final adaLN + linear layer, unpatchify. The conditioning
vector c = MLP(emb(c_noise)) + sum over class/scalar/vector conditions of their embeddings; each block regresses
(shift, scale, gate) for its attention and MLP branches from SiLU(c) through a zero-initialised linear map, so
every block is exactly the identity at init; the final layer is zero-initialised too, so the network outputs 0.
A context condition adds a cross-attention branch after self-attention (as in PixArt-alpha, Chen et al. 2023)
whose output projection starts at 0. Positional encoding: `pos` (posenc.py). Attention goes through
scaled_dot_product_attention; the network computes no logits itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.attention import attend
from torchdiffusion.nn.embedding import PositionalEmbedding
from torchdiffusion.nn.posenc import AxialRoPE, RelativePositionBias, check_pos, sincos


# --------------------------------------------------------------------------------------------- patches
def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, S_1, ..., S_n) -> (B, L, C p^n): token l holds patch l of the grid S / p (row-major), its features
    ordered (C, p, ..., p). Every S_a must be a multiple of p."""
    b, c, *s = x.shape
    g = [side // p for side in s]
    if any(side % p for side in s):
        raise TorchDiffusionError(f"patch size {p} must divide every spatial size, got {tuple(s)}")
    n = len(s)
    t = x.reshape(b, c, *[v for gi in g for v in (gi, p)])                  # (B, C, G_1, p, ..., G_n, p)
    perm = [0] + [2 + 2 * a for a in range(n)] + [1] + [3 + 2 * a for a in range(n)]
    return t.permute(perm).reshape(b, -1, c * p ** n)                       # (B, G_1..G_n, C, p..p) -> (B, L, Cp^n)


def unpatchify(t: Tensor, p: int, grid: Sequence[int]) -> Tensor:
    """(B, L, C p^n) -> (B, C, *(grid * p)), the inverse of patchify."""
    b, _, f = t.shape
    n = len(grid)
    c = f // p ** n
    t = t.reshape(b, *grid, c, *([p] * n))                                  # (B, G_1..G_n, C, p..p)
    perm = [0, n + 1] + [v for a in range(n) for v in (1 + a, n + 2 + a)]
    return t.permute(perm).reshape(b, c, *[gi * p for gi in grid])


# --------------------------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class CondPlan:
    """The declared conditions of a BackboneIO sorted by how a transformer takes them."""

    embedded: tuple = ()   # class / scalar / vector specs: added to the conditioning vector (or as tokens)
    concat: tuple = ()     # concat specs: channels added to x
    context: tuple = ()    # context specs: cross-attended (DiT) or tokens (U-ViT)

    @staticmethod
    def of(io, where: str, max_context: int = 1) -> "CondPlan":
        emb, cat, ctx = [], [], []
        for spec in io.conds:
            {"class": emb, "scalar": emb, "vector": emb, "concat": cat, "context": ctx}[spec.kind].append(spec)
        if len(ctx) > max_context:
            raise ConfigError(f"the {where} backbone takes at most {max_context} context condition, got "
                              f"{[s.key for s in ctx]}")
        return CondPlan(tuple(emb), tuple(cat), tuple(ctx))

    @property
    def concat_channels(self) -> int:
        return sum(s.size for s in self.concat)


def embedding_for(spec, dim: int) -> nn.Module:
    """class: a table of K + 1 rows (the last is the null label); scalar: sin-cos then linear (as the noise level);
    vector: linear."""
    if spec.kind == "class":
        return nn.Embedding(spec.size + 1, dim)
    if spec.kind == "scalar":
        return nn.Sequential(PositionalEmbedding(dim), nn.Linear(dim, dim))
    return nn.Linear(spec.size, dim)


def check_cond(cond: Mapping[str, Tensor], specs: Sequence, x: Tensor, name: str) -> None:
    """One-line errors for missing, unknown or misshapen cond entries."""
    b = x.shape[0]
    known = {s.key for s in specs}
    unknown = set(cond) - known
    if unknown:
        raise TorchDiffusionError(f"{name}: unknown cond keys {sorted(unknown)}; this model declares "
                                  f"{sorted(known) or 'none'}")
    for s in specs:
        c = cond.get(s.key)
        want = {"class": f"({b},) int64 in [0, {s.size}]", "scalar": f"({b},) float", "vector": f"({b}, {s.size})",
                "concat": f"({b}, {s.size}, {', '.join(map(str, x.shape[2:]))})", "context": f"({b}, M, {s.size})"}
        ok = c is not None and (
            (s.kind == "class" and tuple(c.shape) == (b,) and not c.is_floating_point())
            or (s.kind == "scalar" and tuple(c.shape) == (b,))
            or (s.kind == "vector" and tuple(c.shape) == (b, s.size))
            or (s.kind == "concat" and tuple(c.shape) == (b, s.size, *x.shape[2:]))
            or (s.kind == "context" and c.ndim == 3 and c.shape[0] == b and c.shape[2] == s.size))
        if not ok:
            got = "nothing" if c is None else f"{tuple(c.shape)} {c.dtype}"
            raise TorchDiffusionError(f"{name}: cond[{s.key!r}] must be {want[s.kind]}, got {got}")
        if s.kind == "class" and b and (int(c.min()) < 0 or int(c.max()) > s.size):
            raise TorchDiffusionError(f"{name}: cond[{s.key!r}] values must be in [0, {s.size}] ({s.size} = null "
                                      f"label), got [{int(c.min())}, {int(c.max())}]")


def grid_of(shape: Sequence[int], p: int, where: str) -> tuple[int, ...]:
    """The token grid S / p of a diffusion-space shape (C, *S), or a one-line error."""
    s = tuple(int(v) for v in shape[1:])
    if not s or any(v % p for v in s):
        raise ConfigError(f"{where}: patch_size {p} must divide every spatial size of the model's shape "
                          f"{tuple(shape)}; use a patch size that divides {'x'.join(map(str, s)) or 'it'}")
    return tuple(v // p for v in s)


# --------------------------------------------------------------------------------------------- layers
class Mlp(nn.Sequential):
    """Linear -> GELU (tanh) -> Linear (Peebles & Xie 2023, from ViT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention over (B, N, D) tokens with the model's positional encoding (rope, bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: Tensor, rope=None, bias: Optional[Tensor] = None) -> Tensor:
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads, rope, bias))


class TokenCrossAttention(nn.Module):
    """Multi-head attention of (B, N, D) tokens on a (B, M, n) context; no positional encoding (DiT.initialize
    zeroes the output projection)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: Tensor, context: Tensor) -> Tensor:
        k, v = self.kv(context.to(self.kv.weight.dtype)).chunk(2, dim=-1)
        return self.proj(attend(self.q(t), k, v, self.heads))


def modulate(t: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: t (B, N, D) * (1 + scale) + shift, scale/shift (B, D)."""
    return t * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """t + g1 * Attn(adaLN(t)) [+ CrossAttn(LN(t), context)] + g2 * MLP(adaLN(t)) with (shift, scale, gate) x 2
    regressed from SiLU(c) by a zero-initialised linear map (adaLN-Zero, Peebles & Xie 2023, sec. 3.2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TokenSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.xnorm = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.xattn = TokenCrossAttention(dim, context_dim, heads) if context_dim else None
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, t: Tensor, c: Tensor, context: Optional[Tensor], rope=None, bias=None) -> Tensor:
        """t (B, N, D), c (B, D) = SiLU(conditioning vector) -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        t = t + gate1[:, None, :] * self.attn(modulate(self.norm1(t), shift1, scale1), rope, bias)
        if self.xattn is not None:
            t = t + self.xattn(self.xnorm(t), context)
        return t + gate2[:, None, :] * self.mlp(modulate(self.norm2(t), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from SiLU(c)) then a linear map to p^n * out_channels per token; both zero-initialised."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, t: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(t), shift, scale))


# --------------------------------------------------------------------------------------------- the network
@dataclass(frozen=True)
class DiTConfig:
    """DiT settings (`model.backbone: {kind: dit, ...}`). Sizes, channels and conditions come from the data and
    the conditioners (protocols.BackboneIO), not from here. The defaults suit 28-32 px images: DiT-S's head
    width 64 at width 256, 4 heads and 6 layers ("S-like at fewer layers"; DiT-S/2 is width 384, 12 layers,
    6 heads, patch 2: Peebles & Xie 2023, Table 1)."""

    patch_size: int = 2                                    # p: 2 or 4 (Peebles & Xie 2023 use 2, 4, 8)
    width: int = 256                                       # D
    depth: int = 6                                         # number of DiT blocks
    heads: int = 4
    mlp_ratio: float = 4.0                                 # MLP hidden width / D (Peebles & Xie 2023)
    pos: Literal["absolute", "rope", "relbias"] = "absolute"  # posenc.py; DiT uses absolute sin-cos
    rope_base: float = 100.0                               # rope: theta_i = base^(-i / m) (Heo et al. 2024)
    rel_buckets: int = 32                                  # relbias: buckets per axis (Raffel et al. 2020)
    rel_max_distance: int = 128                            # relbias: distances beyond share the last bucket (T5)
    noise_freqs: int = 256                                 # sin-cos features of c_noise before the MLP (DiT)

    def __post_init__(self):
        check_pos(self.pos, "DiTConfig.pos")
        if self.patch_size < 1:
            raise ConfigError(f"DiTConfig.patch_size must be >= 1 (2 or 4 suit 28-32 px), got {self.patch_size}")
        for name in ("width", "depth", "heads", "noise_freqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"DiTConfig.heads={self.heads} must divide width={self.width}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.noise_freqs % 2:
            raise ConfigError(f"DiTConfig.noise_freqs must be even, got {self.noise_freqs}")


def make_positions(module: nn.Module, pos: str, grid, width: int, heads: int, cfg) -> None:
    """Attach the positional encoding of kind `pos` to a transformer: a `pos_embed` buffer (absolute), `rope` or
    `relbias` submodules (None where unused)."""
    module.register_buffer("pos_embed", sincos(grid, width) if pos == "absolute" else None, persistent=False)
    module.rope = AxialRoPE(grid, width // heads, cfg.rope_base) if pos == "rope" else None
    module.relbias = (RelativePositionBias(grid, heads, cfg.rel_buckets, cfg.rel_max_distance)
                      if pos == "relbias" else None)


class DiT(nn.Module):
    """The diffusion transformer for a BackboneIO; see the module docstring for shapes. Output starts at 0."""

    def __init__(self, cfg: DiTConfig, io):
        super().__init__()
        if not isinstance(cfg, DiTConfig):
            raise ConfigError(f"DiT expects a DiTConfig, got {type(cfg).__name__}")
        self.cfg, self.io = cfg, io
        self.plan = plan = CondPlan.of(io, "dit")
        p, d = cfg.patch_size, cfg.width
        self.grid = grid_of(io.shape, p, "dit")
        n = len(self.grid)
        self.in_channels = io.shape[0]
        self.patch_embed = nn.Linear((self.in_channels + plan.concat_channels) * p ** n, d)
        make_positions(self, cfg.pos, self.grid, d, cfg.heads, cfg)
        self.noise_embed = PositionalEmbedding(cfg.noise_freqs)
        self.noise_mlp = nn.Sequential(nn.Linear(cfg.noise_freqs, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_embed = nn.ModuleDict({s.key: embedding_for(s, d) for s in plan.embedded})
        context_dim = plan.context[0].size if plan.context else 0
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, context_dim) for _ in range(cfg.depth))
        self.final = FinalLayer(d, io.out_channels * p ** n)
        self.initialize()

    def initialize(self) -> None:
        """DiT's init (Peebles & Xie 2023, code): Xavier-uniform linears, N(0, 0.02) embeddings, and zeros for
        every adaLN modulation, the final linear map and the cross-attention output projections."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for lin in (self.noise_mlp[0], self.noise_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.final.modulation, self.final.linear]
        for blk in self.blocks:
            zero.append(blk.modulation)
            if blk.xattn is not None:
                zero.append(blk.xattn.proj)
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, c_noise: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """SiLU of the conditioning vector: MLP(emb(c_noise)) + every class/scalar/vector embedding, (B, D)."""
        c = self.noise_mlp(self.noise_embed(c_noise))
        for key, net in self.cond_embed.items():
            v = cond[key]
            c = c + net(v if isinstance(net, nn.Embedding) else v.to(c.dtype))
        return F.silu(c)

    def tokens(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """x (B, C, *S) (+ concat conditions) -> patch tokens (B, L, D) with absolute positions where chosen."""
        if self.plan.concat:
            x = torch.cat([x] + [cond[s.key].to(x.dtype) for s in self.plan.concat], dim=1)
        t = self.patch_embed(patchify(x, self.cfg.patch_size))
        return t + self.pos_embed.to(t.dtype) if self.pos_embed is not None else t

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """x (B, C, *S), c_noise (B,), cond (module docstring) -> (B, out_channels, *S)."""
        cond = {} if cond is None else cond
        self.check_inputs(x, c_noise, cond)
        c = self.condition(c_noise, cond)
        t = self.tokens(x, cond)                                           # (B, L, D)
        context = cond[self.plan.context[0].key] if self.plan.context else None
        bias = self.relbias() if self.relbias is not None else None        # (heads, L, L), shared by all blocks
        for blk in self.blocks:
            t = blk(t, c, context, self.rope, bias)
        return unpatchify(self.final(t, c), self.cfg.patch_size, self.grid)  # (B, out_channels, *S)

    def check_inputs(self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor]) -> None:
        want = (self.in_channels, *(g * self.cfg.patch_size for g in self.grid))
        if tuple(x.shape[1:]) != want:
            raise TorchDiffusionError(f"DiT input x must be (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise TorchDiffusionError(f"c_noise must have shape (B,) = ({x.shape[0]},), got {tuple(c_noise.shape)}")
        check_cond(cond, self.io.conds, x, "DiT")


def build_dit(cfg: DiTConfig, io) -> DiT:
    """The backbone-registry builder (protocols.BackboneIO gives shape, output channels and conditions)."""
    return DiT(cfg, io)
