"""Rewrite configs of earlier releases into today's layout on read, so their run folders keep loading.

Release 0.1.0 (before model.backbone / model.codec / cond.<name>) stored
    model: {process: {kind, T: null, ...every process option, null when unset}, unet: {image_size, in_channels,
            out_channels, num_classes, context_dim, concat_channels, ...}, ...}
    cond: {kind: none | class, p_uncond}
Today's layout:
    model: {process: {kind, <that kind's options>}, backbone: {kind: unet, <architecture only>},
            codec: {kind: identity}, data_shape: [C, H, W], ...}
    cond: {label: {kind: class, num_classes, p_uncond}}   ({} when unconditional)
The old keys are also accepted in presets and --set overrides (model.unet.X, cond.kind=class); where an old and a
new key give the same setting, the old one (an override written for the earlier layout) wins.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError

UNET_IO = ("image_size", "in_channels", "out_channels")
UNET_COND = ("num_classes", "context_dim", "concat_channels")


def _old_cond(cond: Any) -> bool:
    return isinstance(cond, dict) and (isinstance(cond.get("kind"), str) or "p_uncond" in cond)


def migrate_run_config(d: dict) -> dict:
    """A run config dict of any release -> today's layout (see the module docstring); today's dicts pass through."""
    model = d.get("model")
    if not _old_cond(d.get("cond")) and not (isinstance(model, dict) and "unet" in model):
        return d
    d = dict(d)
    old_unet = dict(model.get("unet") or {}) if isinstance(model, dict) else {}
    backbone = dict(model.get("backbone") or {}) if isinstance(model, dict) else {}
    num_classes = old_unet.get("num_classes", backbone.get("num_classes", 0)) or 0
    cond = d.get("cond")
    if _old_cond(cond):
        kind = cond.get("kind", "none")
        extra = sorted(set(cond) - {"kind", "p_uncond"})
        if extra:
            raise ConfigError(f"cond: {', '.join(extra)} cannot be mixed with cond.kind (the layout of release 0.1.0); "
                              f"write cond: {{label: {{kind: class, p_uncond: 0.1}}}}")
        if kind == "class":
            d["cond"] = {"label": {"kind": "class", "num_classes": num_classes,
                                   "p_uncond": cond.get("p_uncond", 0.1)}}
        elif kind == "none":
            if num_classes:
                raise ConfigError(f"model.unet.num_classes={num_classes} needs class labels; set cond.kind=class "
                                  f"(or model.unet.num_classes=0 for an unconditional model)")
            d["cond"] = {}
        else:
            raise ConfigError(f"cond.kind: {kind!r} is not valid; valid: none, class")
    elif num_classes and "unet" in (model or {}):
        label = dict((d.get("cond") or {}).get("label") or {})
        if not label:
            raise ConfigError(f"model.unet.num_classes={num_classes} needs a class conditioner; set "
                              f"cond.label.kind=class (or cond.kind=class)")
        if label.get("num_classes", 0) not in (0, num_classes):
            raise ConfigError(f"model.unet.num_classes={num_classes} but cond.label.num_classes="
                              f"{label['num_classes']}")
    if isinstance(model, dict):
        d["model"] = migrate_model_config(model)
    return d


def migrate_model_config(m: dict) -> dict:
    """model: {unet: ...} -> model: {backbone: {kind: unet, ...}, data_shape}; process options without nulls."""
    m = dict(m)
    if "unet" in m:
        old = dict(m.pop("unet") or {})
        backbone = dict(m.get("backbone") or {})
        if backbone.get("kind", "unet") != "unet":
            raise ConfigError(f"model.unet (the layout of release 0.1.0) and model.backbone.kind="
                              f"{backbone['kind']!r} cannot be mixed; use model.backbone only")
        for key in ("context_dim", "concat_channels"):
            if old.get(key):
                raise ConfigError(f"model.unet.{key} is now set from the conditioners, and no conditioner of this "
                                  f"release supplies it; remove it")
        io = {k: old.pop(k) for k in UNET_IO if k in old}
        for k in UNET_COND:
            old.pop(k, None)
            backbone.pop(k, None)
        if io and not m.get("data_shape"):
            size = io.get("image_size", 28)
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            m["data_shape"] = [int(io.get("in_channels", 1)), int(h), int(w)]
        m["backbone"] = {**backbone, **old, "kind": "unet"}
    process = m.get("process")
    if isinstance(process, dict) and any(v is None for v in process.values()):
        m["process"] = {k: v for k, v in process.items() if v is not None}
    return m
