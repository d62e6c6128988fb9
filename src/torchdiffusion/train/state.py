"""Training state as tensors + JSON: optimiser and scheduler state dicts, RNG states.

A checkpoint holds no pickle (RELIABILITY 15), so every piece of state is split in two:
the tensors, stored in a safetensors file under path-like keys ("state/0/exp_avg"), and a JSON
skeleton that mirrors the original nested structure with the tensors replaced by references.

Skeleton encoding (lossless for the types optimiser and scheduler state dicts hold):
    None, bool, int, str, finite float  -> themselves (Python's float repr round-trips exactly)
    non-finite float                    -> {"__float__": "nan" | "inf" | "-inf"}
    list                                -> list
    tuple                               -> {"__tuple__": [...]}
    Tensor                              -> {"__tensor__": key}
    dict with str keys                  -> dict (unless it could be mistaken for a tag above)
    any other dict (int keys, ...)      -> {"__dict__": [[key, value], ...]}
"""
from __future__ import annotations

import math
import random
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from torchdiffusion.errors import CheckpointError

_TAGS = ("__float__", "__tuple__", "__tensor__", "__dict__", "__ndarray__")


# ---------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------------------

def flatten_state(tree: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into tensors and a JSON skeleton.

    Tensors are detached and moved to the CPU; keys are the '/'-joined path to each tensor.
    Raises CheckpointError naming the path of a value that is neither a tensor nor JSON-able.
    """
    tensors: dict[str, Tensor] = {}

    def key_for(path: list[str]) -> str:
        key = "/".join(path) or "value"
        unique, n = key, 1
        while unique in tensors:  # paths like {1: ..} and {"1": ..} would collide
            unique, n = f"{key}#{n}", n + 1
        return unique

    def encode(obj: Any, path: list[str]) -> Any:
        if isinstance(obj, Tensor):
            key = key_for(path)
            tensors[key] = obj.detach().cpu()
            return {"__tensor__": key}
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, list):
            return [encode(v, path + [str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"__tuple__": [encode(v, path + [str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, Mapping):
            plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
            if plain:
                return {k: encode(v, path + [k]) for k, v in obj.items()}
            return {"__dict__": [[encode(k, path + ["key"]), encode(v, path + [str(k)])] for k, v in obj.items()]}
        where = "/".join(path) or "the top level"
        raise CheckpointError(
            f"cannot store state at '{where}': {type(obj).__name__} is neither a tensor nor a JSON value "
            "(None, bool, int, float, str, list, tuple, dict)"
        )

    return tensors, encode(tree, [])


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Inverse of flatten_state. Raises CheckpointError if a referenced tensor is missing."""

    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tensor__":
                if value not in tensors:
                    raise CheckpointError(f"state refers to tensor '{value}', which the tensor file does not hold")
                return tensors[value]
            if tag == "__float__":
                return float(value)
            if tag == "__tuple__":
                return tuple(decode(v) for v in value)
            if tag == "__dict__":
                return {_hashable(decode(k)): decode(v) for k, v in value}
        return {k: decode(v) for k, v in obj.items()}

    return decode(skeleton)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], Any]:
    """torch.optim.Optimizer.state_dict() -> (tensors, JSON skeleton); see flatten_state."""
    return flatten_state(state_dict)


def unflatten_optimizer_state(tensors: Mapping[str, Tensor], skeleton: Any) -> dict[str, Any]:
    """(tensors, skeleton) -> a state dict that Optimizer.load_state_dict accepts, bit-exact."""
    state = unflatten_state(tensors, skeleton)
    if not isinstance(state, dict) or "param_groups" not in state:
        raise CheckpointError("optimizer state has no 'param_groups'; it was not written by flatten_optimizer_state")
    return state


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------

def capture_rng(
    generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Snapshot every random stream a training run draws from.

    Returns (tensors, meta): tensors hold the torch states as uint8 tensors ("torch_cpu",
    "torch_cuda/<i>", "generator/<name>"); meta holds Python's `random`, numpy's global
    RandomState and the named numpy Generators as JSON.
    """
    tensors: dict[str, Tensor] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = state.cpu()
    for name, gen in (generators or {}).items():
        tensors[f"generator/{name}"] = gen.get_state().cpu()

    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    meta = {
        "python_random": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy_global": {"bit_generator": kind, "key": keys.tolist(), "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "numpy_generators": {name: _np_to_json(g.bit_generator.state) for name, g in (numpy_generators or {}).items()},
        "generators": {name: str(gen.device) for name, gen in (generators or {}).items()},
    }
    return tensors, meta


def restore_rng(
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> list[str]:
    """Put back the streams saved by capture_rng; the next draws equal those after the capture.

    Each named generator passed in must have been saved. Returns the names of saved streams
    that were not restored (e.g. CUDA states on a machine without that many GPUs) so the
    caller can report them.
    """
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        py = meta["python_random"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npg = meta["numpy_global"]
        np.random.set_state((npg["bit_generator"], np.asarray(npg["key"], dtype=np.uint32), npg["pos"],
                             npg["has_gauss"], npg["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"RNG state is incomplete or damaged ({type(e).__name__}: {e})") from None

    for name, gen in (generators or {}).items():
        key = f"generator/{name}"
        if key not in tensors:
            saved = sorted(k.split("/", 1)[1] for k in tensors if k.startswith("generator/"))
            raise CheckpointError(f"RNG state has no generator '{name}' (saved: {', '.join(saved) or 'none'})")
        gen.set_state(tensors[key])
    saved_np = meta.get("numpy_generators", {})
    for name, g in (numpy_generators or {}).items():
        if name not in saved_np:
            saved = ", ".join(sorted(saved_np)) or "none"
            raise CheckpointError(f"RNG state has no numpy generator '{name}' (saved: {saved})")
        g.bit_generator.state = _json_to_np(saved_np[name])

    skipped = []
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda/")), key=lambda k: int(k.split("/")[1]))
    if cuda_keys:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_keys):
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda_keys])
        else:
            skipped.extend(cuda_keys)
    skipped.extend(f"generator/{n}" for n in meta.get("generators", {}) if n not in (generators or {}))
    skipped.extend(f"numpy_generators/{n}" for n in saved_np if n not in (numpy_generators or {}))
    return skipped


def _np_to_json(obj: Any) -> Any:
    """numpy bit-generator state (dicts of ints and uint arrays) -> JSON."""
    if isinstance(obj, dict):
        return {k: _np_to_json(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": str(obj.dtype), "data": obj.tolist()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _json_to_np(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["data"], dtype=np.dtype(obj["__ndarray__"]))
        return {k: _json_to_np(v) for k, v in obj.items()}
    return obj
