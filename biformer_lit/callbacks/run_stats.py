"""Per-run measurements for comparing runs: parameters, GMACs at the training resolution (attention and routing
included, see biformer_lit.flops), training speed and memory (a timed pass of training steps, see
biformer_lit.speed), the class count, and the best validation top-1 with that validation's top-5. Logged once at
the end of fit under tags the report reads, and to TensorBoard's HPARAMS tab with the run's knobs as separate
columns (per-stage lists become one column per stage).
"""
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..flops import count_gmacs
from ..speed import training_speed


def flatten_knobs(d: dict, prefix: str = "") -> dict:
    """{'model_kwargs': {'topks': [1, 4]}} -> {'model_kwargs.topks.0': 1, 'model_kwargs.topks.1': 4}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_knobs(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out.update(flatten_knobs({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class RunStats(L.Callback):
    """Args: knobs: what distinguishes this run (e.g. an ablation arm's overrides) for the HPARAMS tab;
    speed_steps: timed training steps of the speed measurement (after 2 of warm-up; 0: not measured)."""

    def __init__(self, knobs: Optional[dict] = None, speed_steps: int = 5):
        self.knobs = dict(knobs or {})
        self.speed_steps = speed_steps
        self.best = {}
        self.measured = {}

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        img = getattr(pl_module.hparams, "img_size", None) or getattr(dm, "img_size", 224)
        classes = getattr(pl_module.hparams, "num_classes", None)
        self.measured = {"model/params_m": sum(p.numel() for p in pl_module.model.parameters()) / 1e6,
                         "model/gmacs": count_gmacs(pl_module.model, img)}
        if classes:
            self.measured["data/num_classes"] = classes
        batch = getattr(dm, "batch_size", None)
        if self.speed_steps and batch and classes:
            speed = training_speed(pl_module.model, batch, img, classes, steps=self.speed_steps,
                                   autocast=trainer.precision_plugin.forward_context)
            self.measured.update({"perf/train_images_per_sec": speed["images_per_sec"],
                                  "perf/peak_train_memory_mb": speed["peak_memory_mb"],
                                  "perf/cuda": float(speed["cuda"])})

    def on_validation_end(self, trainer, pl_module):
        # not on_validation_epoch_end: callbacks run that hook before the epoch's metrics are
        # reduced into callback_metrics, so it would see the previous epoch's values
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        # the best top-1 and the top-5 of that same validation (the checkpoint `best-*` keeps), as the report
        if "val/top1" in metrics and float(metrics["val/top1"]) > self.best.get("val/top1", float("-inf")):
            self.best = {tag: float(metrics[tag]) for tag in ("val/top1", "val/top5") if tag in metrics}

    def summary(self, pl_module) -> dict:
        out = dict(self.measured)
        for tag, v in self.best.items():
            out["best/" + tag.replace("/", "_")] = v
        return out

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        stats = self.summary(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
            knobs = flatten_knobs(dict(self.knobs, model=pl_module.hparams.get("model", "")))
            logger.log_hyperparams(knobs, metrics=stats) if _takes_metrics(logger) else logger.log_hyperparams(knobs)
            logger.save()

    def state_dict(self):
        return dict(best=self.best)

    def load_state_dict(self, state):
        self.best = dict(state.get("best", {}))


def _takes_metrics(logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger
    return isinstance(logger, TensorBoardLogger)
