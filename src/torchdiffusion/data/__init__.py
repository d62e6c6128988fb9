"""Data: in-memory uint8 image sets, a deterministic batch order, and the image-folder checker.

Items and batches are dicts with fixed keys (DESIGN 2.11): "x" uint8 (C, H, W) / (B, C, H, W)
and "label" int64 (-1 when unlabelled). `to_model_range` maps uint8 to the model's [-1, 1].
Row 2 of the layering: imports only torch, numpy, Pillow and torchdiffusion.errors.
"""
from torchdiffusion.data.check import CATEGORIES, CheckReport, check
from torchdiffusion.data.convert import pad_to, to_model_range, to_uint8
from torchdiffusion.data.dataset import ImageArrayDataset, dataset_fingerprint
from torchdiffusion.data.factory import open_dataset
from torchdiffusion.data.fashion_mnist import load_fashion_mnist
from torchdiffusion.data.folder import load_image_folder
from torchdiffusion.data.image_decode import BAD_CATEGORIES, CHANNEL_POLICIES, TRAITS
from torchdiffusion.data.mnist import load_mnist
from torchdiffusion.data.order import (batch_indices, epoch_permutation, epoch_seed, epoch_shard,
                                       iterate_batches, steps_per_epoch)
from torchdiffusion.data.splits import SPLITS

__all__ = [
    "BAD_CATEGORIES", "CATEGORIES", "CHANNEL_POLICIES", "CheckReport",
    "ImageArrayDataset", "SPLITS", "TRAITS", "batch_indices", "check", "dataset_fingerprint",
    "epoch_permutation", "epoch_seed", "epoch_shard", "iterate_batches", "load_fashion_mnist",
    "load_image_folder", "load_mnist", "open_dataset", "pad_to", "steps_per_epoch", "to_model_range", "to_uint8",
]
