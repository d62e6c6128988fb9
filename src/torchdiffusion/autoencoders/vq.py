"""The vector-quantised autoencoder (VQGAN, Esser et al. 2021, Sec. 3.1; van den Oord et al. 2017) and its use as
latent diffusion's VQ-regularised first stage with the quantiser absorbed in the decoder (Rombach et al. 2022,
Sec. 3.1 and Appendix G).

Notation: x (B, C, H, W) in [-1, 1]; h = z_e (B, D, H/f, W/f) the pre-quantisation latent (D = z_channels);
e_k (K, D) the codebook; q(h) the nearest code per position; sg[.] stop-gradient.

    z_q = e_{argmin_k ||h - e_k||^2}                                       (per position)
    straight-through: z_q_st = h + sg[z_q - h]          (the decoder's gradient reaches the encoder unchanged)
    codebook term     ||z_q - sg[h]||^2                 (codebook="loss"; with codebook="ema" the codes follow an
                                                         exponential moving average of their assigned h instead,
                                                         van den Oord et al. 2017, Appendix A.1)
    commitment term   beta ||sg[z_q] - h||^2, beta = 0.25   (it pulls the encoder towards its codes; this is the
                                                         paper's form, not the swapped "legacy" form of the
                                                         reference code, which puts beta on the codebook term)
Both terms are means over all elements of h (B * D * H/f * W/f), as the reference code's mse.

Dead codes: every `restart_every` training forward passes a code no position chose in that window is moved onto
an encoder output of the current batch (chosen by a generator seeded by the pass count, so resuming repeats it).
Code usage is counted over windows (`usage` since reset_usage(), e.g. an epoch or a validation interval), never
as one batch's perplexity.

On several processes (torch.distributed) the EMA statistics and usage counts are summed over all processes and a
restarted code takes process 0's encoder output, so every process keeps the same codebook.

Latent diffusion runs on h (encode): decode(h) quantises first, so decode(encode(x)) equals forward(x)[0].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import Decoder, Encoder, check_spatial, downsampling_factor


@dataclass(frozen=True)
class VQConfig:
    """Sizes of a VQ autoencoder (defaults: a small f = 4 model for 32x32 images; LDM's VQ-f4 uses base_channels
    128, ch_mult (1, 2, 4), z_channels 3 and 8192 codes, Rombach et al. 2022, Table 8)."""
    base_channels: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)  # f = 2 ** (len - 1)
    num_res_blocks: int = 1
    z_channels: int = 3  # code dimension D
    n_codes: int = 256
    beta: float = 0.25  # commitment weight (van den Oord et al. 2017; Esser et al. 2021)
    codebook: Literal["loss", "ema"] = "loss"
    ema_decay: float = 0.99  # van den Oord et al. 2017, Appendix A.1
    restart_every: int = 200  # training forward passes between dead-code restarts; 0 = never
    mid_attn: bool = True
    norm_groups: int = 32  # GroupNorm groups (fewer where a width is not a multiple)
    dropout: float = 0.0
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on CPUs; same maths)

    def __post_init__(self):
        if self.z_channels < 1 or self.n_codes < 2:
            raise ValueError(f"z_channels must be >= 1 and n_codes >= 2, got {self.z_channels} and {self.n_codes}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.beta < 0 or self.restart_every < 0:
            raise ValueError(f"beta and restart_every must be >= 0, got {self.beta} and {self.restart_every}")


def _global_sum(t: Tensor) -> Tensor:
    """t summed over the processes of a torch.distributed job (t itself on one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def _from_first_process(t: Tensor) -> Tensor:
    """Process 0's t on every process of a torch.distributed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(t, 0)
    return t


class VectorQuantizer(nn.Module):
    """forward(h (B, D, *S), update=True) -> (z_q_st (B, D, *S), vq_loss (), indices (B, *S) int64).

    Updates (EMA codebook, usage counts, dead-code restarts) happen only in training mode with gradients
    enabled and update=True: decoding, validation and a discriminator's no-grad pass never move the codebook."""

    def __init__(self, n_codes: int, dim: int, beta: float = 0.25, codebook: str = "loss", ema_decay: float = 0.99,
                 restart_every: int = 0, eps: float = 1e-5):
        super().__init__()
        self.n_codes, self.dim, self.beta, self.ema = n_codes, dim, beta, codebook == "ema"
        self.decay, self.restart_every, self.eps = ema_decay, restart_every, eps
        self.embedding = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_codes, 1.0 / n_codes)  # as the reference code
        if self.ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.ones(n_codes))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("usage", torch.zeros(n_codes, dtype=torch.int64))  # since reset_usage()
        self.register_buffer("window", torch.zeros(n_codes, dtype=torch.int64))  # since the last restart check
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # training forward passes
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))  # codes restarted so far

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (squared Euclidean distance) of each row of flat (N, D)."""
        with torch.no_grad():
            w = self.embedding.weight
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)
            return d.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, *S) -> codes (B, D, *S)."""
        z = self.embedding(indices)
        return z.movedim(-1, 1)

    def reset_usage(self) -> Tensor:
        """The usage counts (K,) since the last reset, and start a new window."""
        counts = self.usage.clone()
        self.usage.zero_()
        return counts

    @torch.no_grad()
    def _restart(self, flat: Tensor) -> None:
        dead = (self.window == 0).nonzero().flatten()
        if len(dead):
            g = torch.Generator().manual_seed(int(self.calls) * 1_000_003 + 17)
            rows = torch.randint(len(flat), (len(dead),), generator=g).to(flat.device)
            new = _from_first_process(flat[rows].to(self.embedding.weight.dtype).contiguous())
            self.embedding.weight[dead] = new
            if self.ema:
                self.cluster_size[dead] = 1.0
                self.embed_sum[dead] = new
            self.restarts += len(dead)
        self.window.zero_()

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> None:
        n = _global_sum(torch.bincount(indices, minlength=self.n_codes).to(self.cluster_size.dtype))
        sums = _global_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.to(self.embed_sum.dtype)))
        self.cluster_size.mul_(self.decay).add_(n, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (total + self.n_codes * self.eps) * total  # Laplace smoothing
        self.embedding.weight.copy_(self.embed_sum / size.unsqueeze(1))

    def forward(self, h: Tensor, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        updating = update and self.training and torch.is_grad_enabled()
        flat = h.movedim(1, -1).reshape(-1, self.dim)  # (N, D), N = B * prod(S)
        if updating and self.restart_every and int(self.calls) > 0 and int(self.calls) % self.restart_every == 0:
            self._restart(flat.detach())
        indices = self.nearest(flat.detach())
        z_q = self.lookup(indices.view(h.shape[:1] + h.shape[2:]))
        commitment = F.mse_loss(h, z_q.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(z_q, h.detach()) + self.beta * commitment
        if updating:
            if self.ema:
                self._ema_update(flat.detach(), indices)
            counts = _global_sum(torch.bincount(indices, minlength=self.n_codes))
            self.usage += counts
            self.window += counts
            self.calls += 1
        z_q_st = h + (z_q - h).detach()
        return z_q_st, loss, indices.view(h.shape[:1] + h.shape[2:])


class VQAutoencoder(nn.Module):
    """encode(x) -> h (pre-quantisation), quantize(h) -> (z_q, vq_loss, indices), decode(h) -> x_hat (quantises
    inside), decode_indices(indices) -> x_hat, forward(x) -> (x_hat, vq_loss, indices)."""

    kind = "vq"

    def __init__(self, cfg: VQConfig = VQConfig(), in_channels: int = 1):
        super().__init__()
        self.cfg, self.in_channels = cfg, in_channels
        self.f = downsampling_factor(cfg.ch_mult)
        args = (cfg.base_channels, cfg.ch_mult, cfg.num_res_blocks, cfg.mid_attn, cfg.norm_groups, cfg.dropout)
        self.encoder = Encoder(in_channels, cfg.z_channels, *args)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.quantizer = VectorQuantizer(cfg.n_codes, cfg.z_channels, cfg.beta, cfg.codebook, cfg.ema_decay,
                                         cfg.restart_every)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.z_channels, in_channels, *args)
        self._format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x.contiguous(memory_format=self._format)))

    def quantize(self, h: Tensor, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        return self.quantizer(h, update)

    def decode_quantized(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q.contiguous(memory_format=self._format)))

    def decode(self, h: Tensor) -> Tensor:
        """Quantise h (never updating the codebook) and decode: the quantiser absorbed in the decoder."""
        return self.decode_quantized(self.quantize(h, update=False)[0])

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, H/f, W/f) of codes -> x_hat (B, C, H, W)."""
        return self.decode_quantized(self.quantizer.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_q, vq_loss, indices = self.quantize(self.encode(x))
        return self.decode_quantized(z_q), vq_loss, indices

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    def latent_shape(self, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(z_channels, H/f, W/f) of data of shape (C, H, W)."""
        check_spatial(data_shape, self.f, "data")
        return (self.cfg.z_channels, int(data_shape[-2]) // self.f, int(data_shape[-1]) // self.f)
