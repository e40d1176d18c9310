"""Log routing pictures of a few fixed validation images to TensorBoard while training.

The images are the first `num_images` of the first validation batch, kept for the whole run, so
successive epochs show how the routing of the same images evolves. Capture is switched on only for
the one extra forward the pictures need (visualize.record_layers restores every flag afterwards);
without this callback nothing of it runs.
"""
from typing import Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.loggers.logger import DummyLogger

from ..visualize import IMAGENET_MEAN, IMAGENET_STD, figure_to_array, record_layers, routing_figure, select_layers


def _images_of(batch) -> Optional[torch.Tensor]:
    """The image tensor of a batch: the batch itself, its first item, or an 'image'/'x' entry."""
    if isinstance(batch, dict):
        batch = batch.get("image", batch.get("x"))
    elif isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return batch if isinstance(batch, torch.Tensor) and batch.dim() == 4 else None


class RoutingVisualizer(L.Callback):
    """At the validation of epochs 0, n, 2n, ... (n = every_n_epochs), add one routing figure per
    (image, stage) under `routing/stage{s}_{kind}/img{i}` at the global step (last block of each
    stage; `stages` None = all stages). Sanity-check validation only picks the images.

    query_regions: region ids drawn in the left panel (default: three spread-out regions).
    mean / std: the normalisation of the validation images, undone for display (None: already [0, 1];
    "data": the datamodule's `normalisation`, or ImageNet's without one).
    """

    def __init__(self, num_images: int = 2, every_n_epochs: int = 1, query_regions: Optional[Sequence[int]] = None,
                 stages: Optional[Sequence[int]] = None, mean: Union[str, Sequence[float], None] = "data",
                 std: Union[str, Sequence[float], None] = "data"):
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"num_images={num_images}, every_n_epochs={every_n_epochs}; both must be >= 1")
        self.num_images, self.every_n_epochs = num_images, every_n_epochs
        self.query_regions = list(query_regions) if query_regions is not None else None
        self.stages = list(stages) if stages is not None else None
        self.mean, self.std = mean, std
        self.images: Optional[torch.Tensor] = None

    def display_stats(self, trainer):
        """(mean, std) to undo for display: as given, or "data" resolved from the trainer's datamodule."""
        data = getattr(getattr(trainer, "datamodule", None), "normalisation", (IMAGENET_MEAN, IMAGENET_STD))
        return (data[0] if isinstance(self.mean, str) else self.mean,
                data[1] if isinstance(self.std, str) else self.std)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.images is None and batch_idx == 0 and dataloader_idx == 0:
            x = _images_of(batch)
            if x is not None:
                self.images = x[: self.num_images].detach().cpu().clone()

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.images is None or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        # loggers that can take pictures (TensorBoard's SummaryWriter); others are left alone
        # (fast_dev_run's DummyLogger would swallow them: skip the work)
        writers = [lg.experiment for lg in trainer.loggers
                   if not isinstance(lg, DummyLogger) and hasattr(lg.experiment, "add_image")]
        if not writers:
            return
        records = record_layers(pl_module, self.images, select_layers(pl_module, self.stages))
        mean, std = self.display_stats(trainer)
        for rec in records:
            for i in range(self.images.shape[0]):
                fig = routing_figure(self.images[i], rec, self.query_regions, batch=i, mean=mean, std=std)
                chw = figure_to_array(fig).transpose(2, 0, 1)
                for writer in writers:
                    writer.add_image(f"routing/stage{rec.stage}_{rec.kind}/img{i}", chw, trainer.global_step)
