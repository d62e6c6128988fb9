"""In-loop evaluation as the training loop runs it (train.eval_every): FID/KID of the EMA's samples on every
process, scored on the main one, and the best checkpoint so far kept in checkpoints/best/ (eval/best.json)."""
from __future__ import annotations

import json
from typing import Any, Protocol

from torch import nn

from . import checkpoint as ckpt


class Evaluator(Protocol):
    """In-loop evaluation as the trainer sees it (implemented by eval.inloop.InLoopEvaluator).

    features(ema, rank, world_size) runs on every process and returns that process's share of the samples'
    features: the rows of seeds rank, rank + W, ... in order. score(all_features) runs on the main process
    with the shares interleaved back into seed order and returns at least {'fid', 'kid', 'kid_std'}."""

    def features(self, model: nn.Module, rank: int, world_size: int) -> Any: ...

    def score(self, features: Any) -> dict: ...


def interleave(parts: list) -> Any:
    """Inverse of the strided split items[r::W]: part r's rows go to positions r, r + W, ... (numpy arrays)."""
    import numpy as np
    w, n = len(parts), sum(len(p) for p in parts)
    out = np.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::w] = p
    return out


def evaluate(trainer) -> dict:
    """FID/KID of the step's eval_model samples (the EMA): every process samples its share, the main process
    scores the gathered set, every process gets the scores (so all take the same stop decision)."""
    feats = trainer.evaluator.features(trainer.eval_model, trainer.dist.rank, trainer.dist.world_size)
    if not trainer.dist.enabled:
        return trainer.evaluator.score(feats)
    import torch.distributed as tdist
    parts = [None] * trainer.dist.world_size if trainer.dist.is_main else None
    tdist.gather_object(feats, parts, dst=0)
    del feats
    box = [trainer.evaluator.score(interleave(parts)) if trainer.dist.is_main else None]
    del parts
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def record_evaluation(trainer, scores: dict, log) -> None:
    """Track the best value of cfg.eval_metric; on improvement keep the step's weights (EMA and raw) in
    checkpoints/best/ (never pruned by keep_last) and describe them in eval/best.json."""
    metric = trainer.cfg.eval_metric
    value = float(scores[metric])
    improved = value < trainer.best_value
    if improved:
        trainer.best_value, trainer.best_step, trainer.evals_since_best = value, trainer.step, 0
    else:
        trainer.evals_since_best += 1
    weights = trainer.train_step_obj.weights() if improved and trainer.ctx.sharded else None  # collective
    if not trainer.dist.is_main:
        return
    label = "classifier " if str(scores.get("extractor", "")).startswith("classifier") else ""
    log.info(f"step {trainer.step} eval: {label}FID-{scores.get('eval_n', '?')} {scores['fid']:.3f} "
             f"{label}KID {scores['kid']:.5f} +- {scores['kid_std']:.5f}; best {label}{metric.upper()} "
             f"{trainer.best_value:.5g} at step {trainer.best_step}"
             + (f" ({trainer.evals_since_best} evaluation(s) without improvement)" if not improved else ""))
    eval_dir = trainer.run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    entry = {"step": trainer.step, **{k: v for k, v in scores.items() if isinstance(v, (int, float, str))}}
    with open(eval_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    if improved:
        best_dir = trainer.ckpt_dir / "best"
        path = ckpt.save_checkpoint(
            best_dir, trainer.step,
            tensors=weights or trainer.train_step_obj.weights(),
            meta={"config": trainer.resolved_config, "eval": entry,
                  "trainer": {"step": trainer.step, "images_seen": trainer.step * trainer.cfg.batch_size},
                  "data_fingerprint": trainer.data_fingerprint},
            data_fingerprint=trainer.data_fingerprint)
        ckpt.prune(best_dir, 1)
        record = {"metric": metric, "value": value, "step": trainer.step,
                  "checkpoint": str(path.relative_to(trainer.run_dir)), "scores": entry}
        tmp = eval_dir / "best.json.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(eval_dir / "best.json")
