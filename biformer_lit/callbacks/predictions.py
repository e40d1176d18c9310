"""PredictionWriter: `python cli.py predict` writes what it predicted (LightningCLI discards the return value)."""
import csv
import os

from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """predictions.csv in the run's log folder: per image its index in the split, label, predicted class,
    that class's probability and the top-5 classes. One file per process under DDP (predictions_rank<r>.csv),
    each holding that process's share of the split under the images' own indices. (A BasePredictionWriter
    so that Lightning hands over the indices its sampler drew: counting rows gave every process's file the
    indices 0, 1, 2, ..., under DDP not the images they name.)"""

    def __init__(self, top: int = 5):
        super().__init__(write_interval="batch")
        self.top = top
        self.rows = []

    def on_predict_epoch_start(self, trainer, pl_module):
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        labels = batch[1].tolist() if isinstance(batch, (list, tuple)) and len(batch) > 1 else [None] * len(prediction)
        indices = list(batch_indices or [])
        if len(indices) != len(prediction):  # not known (a loader Lightning could not track): in order
            indices = range(len(self.rows), len(self.rows) + len(prediction))
        top = prediction.topk(min(self.top, prediction.shape[-1]), dim=-1)
        for i, label, p, k in zip(indices, labels, top.values.tolist(), top.indices.tolist()):
            self.rows.append([int(i), label, k[0], round(p[0], 6), " ".join(map(str, k))])

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
