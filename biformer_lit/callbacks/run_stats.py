"""Per-run measurements for comparing runs: parameters, GMACs at the training resolution (attention
and routing included, see biformer_lit.flops), training images/s, peak memory, best validation top-1 /
top-5. Logged once at the end of fit under tags the report reads, and to TensorBoard's HPARAMS tab
with the run's knobs as separate columns (per-stage lists become one column per stage).
"""
import resource
import time
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..flops import count_gmacs


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


class RunStats(L.Callback):
    """Args: knobs: what distinguishes this run (e.g. an ablation arm's overrides) for the HPARAMS tab;
    skip_batches: first training batches left out of the throughput (warm-up)."""

    def __init__(self, knobs: Optional[dict] = None, skip_batches: int = 1):
        self.knobs = dict(knobs or {})
        self.skip_batches = skip_batches
        self.best = {}
        self._images = 0
        self._seconds = 0.0
        self._seen = 0
        self._t0 = None
        self.gmacs = None

    def on_fit_start(self, trainer, pl_module):
        img = getattr(pl_module.hparams, "img_size", None) or getattr(trainer.datamodule, "img_size", 224)
        self.gmacs = count_gmacs(pl_module.model, img) if trainer.is_global_zero else None
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._seen += 1
        if self._seen > self.skip_batches and self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
            self._images += len(batch[0]) * trainer.world_size

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
        out = {"model/params_m": sum(p.numel() for p in pl_module.model.parameters()) / 1e6,
               "perf/peak_memory_mb": peak_memory_mb(pl_module.device)}
        if self.gmacs is not None:
            out["model/gflops"] = self.gmacs
        if self._seconds > 0:
            out["perf/train_images_per_sec"] = self._images / self._seconds
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
        return dict(best=self.best, images=self._images, seconds=self._seconds)

    def load_state_dict(self, state):
        self.best = dict(state.get("best", {}))
        self._images, self._seconds = state.get("images", 0), state.get("seconds", 0.0)


def _takes_metrics(logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger
    return isinstance(logger, TensorBoardLogger)
