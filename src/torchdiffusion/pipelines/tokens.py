"""Tokens of a VQ first stage: images -> code indices (the data of a token model) and sampled indices -> images.

Notation: a VQ autoencoder (autoencoders.vq) with K = n_codes codes maps uint8 images (N, C, H, W) to index grids
(N, H/f, W/f) (nearest code of the pre-quantisation latent, the codebook never updated here) and decodes index
grids with decode_indices. Token data are stored as uint8 (N, 1, h, w) (train.token_step.tokens_of), which holds
codebooks of up to 256 codes (VQ-f4 of Fashion-MNIST: 256 codes, 8 x 8 tokens). `token_fingerprint` names a token
set by the first stage's weights fingerprint and the data fingerprint, as the latent cache does.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ..data.convert import to_model_range, to_uint8
from ..errors import ConfigError, DataError

FORMAT = "torchdiffusion-vq-tokens-1"


def codebook_size(vq: nn.Module) -> int:
    """K of a VQ autoencoder; one-line ConfigError for anything else."""
    n = getattr(getattr(vq, "cfg", None), "n_codes", None)
    if getattr(vq, "kind", None) != "vq" or n is None:
        raise ConfigError("token models need a VQ first stage (a `train-ae` run with ae.kind: vq)")
    return int(n)


def check_codebook(vq: nn.Module, num_classes: int) -> None:
    """The token model's K must be the first stage's codebook size (one line otherwise)."""
    k = codebook_size(vq)
    if k != int(num_classes):
        raise ConfigError(f"the VQ first stage has {k} codes but the token model has K = {num_classes} classes; "
                          f"train the token model on this first stage (K = {k}) or pick the VQ run it was trained on")


def token_fingerprint(data_fingerprint: str, vq_fingerprint: str) -> str:
    h = hashlib.sha256()
    for part in (FORMAT, data_fingerprint, vq_fingerprint):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def encode_tokens(vq: nn.Module, x_u8: Tensor, *, batch: int = 256, device="cpu") -> Tensor:
    """uint8 images (N, C, H, W) -> uint8 token grids (N, 1, h, w) (K <= 256)."""
    K = codebook_size(vq)
    if K > 256:
        raise DataError(f"token grids are stored as uint8: codebooks of at most 256 codes, this one has {K}")
    was = vq.training
    vq.eval()
    out = []
    try:
        for i in range(0, len(x_u8), batch):
            h = vq.encode(to_model_range(x_u8[i:i + batch]).to(device))
            _, _, idx = vq.quantize(h, update=False)
            out.append(idx.to(torch.uint8).cpu()[:, None])
    finally:
        vq.train(was)
    return torch.cat(out) if out else torch.empty((0, 1, 0, 0), dtype=torch.uint8)


@torch.no_grad()
def decode_tokens(vq: nn.Module, tokens: Tensor, *, batch: int = 256, device="cpu") -> Tensor:
    """int token grids (N, h, w) in 0..K-1 -> uint8 images (N, C, H, W)."""
    K = codebook_size(vq)
    if tokens.is_floating_point() or tokens.ndim != 3:
        raise DataError(f"tokens must be integer grids (N, h, w), got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= K):
        raise DataError(f"tokens out of range: found {int(tokens.min())}..{int(tokens.max())}, valid 0..{K - 1} "
                        f"(the VQ codebook has {K} codes)")
    out = []
    for i in range(0, len(tokens), batch):
        x = vq.decode_indices(tokens[i:i + batch].long().to(device))
        out.append(to_uint8(x.clamp(-1, 1).cpu()))
    return torch.cat(out)
