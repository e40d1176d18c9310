"""EpochProgress: one line per epoch when Lightning's progress bar is off (the ablation configs turn it off):

    [k_1-4-4/seed_0] epoch 3/12  train loss 1.234  val top-1 45.61%  elapsed 1m02s  ETA arm 3m05s, ablation 12m40s

An ablation's runner tells each arm's process its label and what remains after it (PROGRESS_ENV: runs still to
start after this one, runs at a time, and the ablation's start time); a plain run prints without them.
"""
import json
import os
import sys
import time
from typing import Optional

import lightning as L

PROGRESS_ENV = "BIFORMER_LIT_PROGRESS"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class EpochProgress(L.Callback):
    def __init__(self):
        ablation = json.loads(os.environ.get(PROGRESS_ENV) or "{}")
        self.label: Optional[str] = ablation.get("label")
        self.runs_after: int = ablation.get("runs_after", 0)
        self.parallel: int = max(1, ablation.get("parallel", 1))
        self.ablation_start: Optional[float] = ablation.get("started")
        self._losses = []
        self._start = None
        self._first_epoch = 0

    def _on(self, trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None

    def on_fit_start(self, trainer, pl_module):
        self._start, self._first_epoch = time.time(), trainer.current_epoch  # a resumed run counts from here

    def on_train_epoch_start(self, trainer, pl_module):
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))

    def line(self, epoch: int, max_epochs: int, loss: Optional[float], top1: Optional[float], now: float) -> str:
        """The epoch's line; epoch counts from 1."""
        elapsed = now - self._start
        done = max(1, epoch - self._first_epoch)
        arm_left = elapsed / done * max(0, max_epochs - epoch)
        parts = [f"epoch {epoch}/{max_epochs}"]
        parts += [f"train loss {loss:.4f}"] if loss is not None else []
        parts += [f"val top-1 {top1:.2f}%"] if top1 is not None else []
        parts += [f"elapsed {duration(elapsed)}", f"ETA arm {duration(arm_left)}"]
        if self.ablation_start is not None:  # the runs after this one, each about as long as this one
            whole = (elapsed + arm_left) * self.runs_after / self.parallel + arm_left
            parts[-1] += f", ablation {duration(whole)} (elapsed {duration(now - self.ablation_start)})"
        return (f"[{self.label}] " if self.label else "") + "  ".join(parts)

    def on_validation_end(self, trainer, pl_module):
        # after the epoch's validation (callback_metrics hold its values); not for the sanity check
        if trainer.sanity_checking or not self._on(trainer) or self._start is None:
            return
        top1 = trainer.callback_metrics.get("val/top1")
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else trainer.current_epoch + 1
        print(self.line(trainer.current_epoch + 1, max_epochs, loss, None if top1 is None else float(top1),
                        time.time()), file=sys.stdout, flush=True)
