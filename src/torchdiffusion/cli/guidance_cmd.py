"""Conditional generation on the command line: class conditioning of `train`, and `train-classifier`."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError


def class_conditioning(cfg, train_set, info, device) -> tuple[object, Optional[Callable], Optional[Callable]]:
    """(cfg, make_cond, cond_for) for `train`: with cond.kind=class, model.unet.num_classes is set from the data
    (a value already set must match it), make_cond is the label-dropout data step and cond_for gives training
    grids the labels seed % K. With cond.kind=none both hooks are None."""
    from ..guidance.dropout import LabelDropout, class_labels_for_seeds

    u = cfg.model.unet
    if cfg.cond.kind == "none":
        if u.num_classes > 0:
            raise ConfigError(f"model.unet.num_classes={u.num_classes} needs class labels; set cond.kind=class "
                              f"(or model.unet.num_classes=0 for an unconditional model)")
        return cfg, None, None
    k = train_set.num_classes
    if k < 1 or not train_set.labelled:
        raise ConfigError(f"cond.kind=class needs labelled data, but data.kind={cfg.data.kind} has no class labels; "
                          f"use mnist or fashion-mnist, or data.labels=folder for an image folder")
    if u.num_classes not in (0, k):
        raise ConfigError(f"model.unet.num_classes={u.num_classes} but the data have {k} classes; "
                          f"leave it at 0 (set from the data) or set {k}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unet=dataclasses.replace(u, num_classes=k)))
    make_cond = LabelDropout(k, cfg.cond.p_uncond, cfg.seed, info.rank, info.world_size, device)

    def cond_for(seeds: Sequence[int]):
        return {"label": class_labels_for_seeds(seeds, k).to(device)}

    return cfg, make_cond, cond_for
