"""PredictionWriter: `python cli.py predict` writes what it predicted (LightningCLI discards the return value)."""
import csv
import os

import lightning as L


class PredictionWriter(L.Callback):
    """predictions.csv in the run's log folder: per image its index in the split, label, predicted class,
    that class's probability and the top-5 classes. One file per process under DDP (predictions_rank<r>.csv),
    whose indices follow the distributed sampler's share of the split."""

    def __init__(self, top: int = 5):
        self.top = top
        self.rows = []

    def on_predict_epoch_start(self, trainer, pl_module):
        self.rows = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        labels = batch[1].tolist() if isinstance(batch, (list, tuple)) and len(batch) > 1 else [None] * len(outputs)
        top = outputs.topk(min(self.top, outputs.shape[-1]), dim=-1)
        for label, p, k in zip(labels, top.values.tolist(), top.indices.tolist()):  # loaders run in order
            self.rows.append([len(self.rows), label, k[0], round(p[0], 6), " ".join(map(str, k))])

    def on_predict_epoch_end(self, trainer, pl_module):
        folder = trainer.log_dir or trainer.default_root_dir
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "label", "predicted", "probability", f"top{self.top}"])
            w.writerows(self.rows)
        print(f"wrote {path} ({len(self.rows)} images)")
