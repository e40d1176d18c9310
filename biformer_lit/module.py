"""ClassificationModule: any timm model trained with the BiFormer paper's (DeiT) recipe.

Every piece of the recipe is a constructor switch, so the CLI/YAML can turn it off for ablations:
AdamW with lr scaled by global batch / 512, weight decay off for 1-D params and no_weight_decay()
names, per-step linear warmup then cosine, label smoothing, Mixup/CutMix, drop path, EMA weights.
Logged tags (other tools read them): train/loss, train/lr, val/loss,
val/top1, val/top5, val_ema/top1, val_ema/top5, test/loss, test/top1, test/top5 (accuracy in %).
"""
import math
from typing import Any, Dict, Optional, Tuple

import lightning as L
import timm
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, NotEmptyStr, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from . import models
from .checkpoint import load_init_weights, state_dict_mismatches
from .errors import UserError
from .models.config import BiFormerKwargs
from .settings import NonNegativeFinite, PositiveFinite, Unit, UnitOpen, UnitRightOpen, plain


def create_model(name: str, num_classes: int, img_size: int, drop_path: float,
                 kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """timm.create_model; img_size goes to the models built for a size (BiFormer, ViTs, Swin; not ResNets), and
    model_kwargs (BiFormer's settings) only to BiFormer."""
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}: use a timm model name, e.g. "
                        f"{', '.join(timm.list_models('biformer*'))}")
    biformer = timm.models.model_entrypoint(name).__module__ == models.biformer.__name__
    if kwargs and not biformer:
        raise UserError(f"model_kwargs={kwargs!r}: these are BiFormer's settings; model {name!r} takes none here")
    sized = biformer or getattr(get_pretrained_cfg(name), "fixed_input_size", False)
    return timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path, **(kwargs or {}),
                             **(dict(img_size=img_size) if sized else {}))


def param_groups(model: nn.Module, weight_decay: float):
    """Two AdamW groups: decayed weights, and 1-D params (norms, biases) + model.no_weight_decay() names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no_weight_decay() may name a parameter or a module holding tables (e.g. relative_position_bias_table)
        skipped = p.ndim <= 1 or any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)
        (no_decay if skipped else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier per optimizer step: linear warmup to 1 over `warmup` steps, then cosine to min_ratio.
    A closure, not an object: LambdaLR saves the state of callable objects in the checkpoint, but a
    resumed run should recompute the schedule from its own trainer settings (e.g. more epochs)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


class ClassificationModule(L.LightningModule):
    """Image classification with a timm-registered model.

    Args:
        model: timm model name (BiFormer presets: biformer_tiny/small/base/stl, biformer_cpu_tiny/small/stl).
        model_kwargs: extra arguments to timm.create_model (e.g. depths, embed_dims, n_wins, topks).
        num_classes, img_size: linked from the data module by the CLI; don't set them by hand there.
        lr, min_lr: AdamW base / final lr for a global batch of `base_batch_size`; the run uses
            lr * global_batch / base_batch_size (global batch = batch_size x devices x nodes x accumulation).
        scale_lr: turn the batch scaling off (then lr is used as given).
        weight_decay: AdamW decoupled decay, not applied to 1-D params and no_weight_decay() names.
        warmup_epochs / warmup_steps: linear warmup per step (warmup_steps, if set, wins), then cosine.
        label_smoothing: applied to hard targets, or folded into Mixup's soft targets.
        mixup, cutmix: Beta alphas (0 = off; both 0 = no Mixup/CutMix); mixup_prob: chance a batch is
            mixed; mixup_switch_prob: chance of CutMix instead of Mixup when both are on.
        drop_path: stochastic depth rate (the model's drop_path_rate).
        ema_decay: keep an EMA of the weights (e.g. 0.9998) and report val_ema/top1, val_ema/top5.
        init_from: initialise weights from a Lightning .ckpt, a state dict, or an original BiFormer
            release file ({"model": state_dict}); init_from_ignore_head: keep a new classifier.
    """

    def __init__(self, model: str = "biformer_cpu_tiny", model_kwargs: Optional[BiFormerKwargs] = None,
                 num_classes: int = 10, img_size: PositiveInt = 64,
                 lr: PositiveFinite = 5e-4, min_lr: NonNegativeFinite = 1e-5, base_batch_size: PositiveInt = 512,
                 scale_lr: bool = True, weight_decay: NonNegativeFinite = 0.05,
                 betas: Tuple[UnitRightOpen, UnitRightOpen] = (0.9, 0.999), eps: PositiveFinite = 1e-8,
                 warmup_epochs: NonNegativeFinite = 5.0, warmup_steps: Optional[NonNegativeInt] = None,
                 label_smoothing: UnitRightOpen = 0.1, mixup: NonNegativeFinite = 0.8, cutmix: NonNegativeFinite = 1.0,
                 mixup_prob: Unit = 1.0, mixup_switch_prob: Unit = 0.5, drop_path: UnitRightOpen = 0.1,
                 ema_decay: Optional[UnitOpen] = None,
                 init_from: Optional[NotEmptyStr] = None, init_from_ignore_head: bool = False):
        hparams = plain({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        if min_lr > lr:  # the "decay" would raise the lr
            raise UserError(f"min_lr={min_lr!r} is above lr={lr!r}; allowed: min_lr <= lr")
        self.save_hyperparameters(hparams)
        self.model = create_model(model, num_classes, img_size, drop_path, model_kwargs)
        self.example_input_array = torch.zeros(1, 3, img_size, img_size)  # Lightning's summary counts FLOPs on it
        self.mixup_fn = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                                  num_classes=num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        # created here so its weights are in state_dict (checkpoints restore it); refreshed after init_from
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # not trained: keeps it out of DDP's gradient buckets
            self.ema.train()  # Lightning sets train/eval mode for the whole module; start consistent
        top_k = min(5, num_classes)
        acc = lambda k: MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")  # noqa: E731
        self.metrics = nn.ModuleDict({stage: MetricCollection({"top1": acc(1), "top5": acc(top_k)},
                                                              compute_groups=False)
                                      for stage in ("val", "val_ema", "test")})
        # the mean loss over every image of the split (a mean of per-process means would weigh the
        # images of the smaller DDP shard more)
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self._initialised = False
        self._skipped_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_callbacks(self):
        from .callbacks import EpochProgress, PredictionWriter
        from .reliability import PreemptionCheckpoint
        # the writer acts in predict only; the progress lines when the progress bar is off
        return [PreemptionCheckpoint(), PredictionWriter(), EpochProgress()]

    # --- set-up --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Here rather than in __init__: load_from_checkpoint must not need the init file. On resume
        # (--ckpt_path) the checkpoint is restored after setup and overwrites these weights.
        if self.hparams.init_from and not self._initialised:
            load_init_weights(self.model, self.hparams.init_from, self.hparams.init_from_ignore_head)
            rank_zero_info(f"initialised {self.hparams.model} from {self.hparams.init_from}")
            if self.ema is not None:
                self.ema.set(self.model)
        self._initialised = True

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Lightning's strict load would end in a long traceback; say what does not fit, and the way out
        problems = state_dict_mismatches(checkpoint.get("state_dict", {}), self.state_dict())
        if problems and self.strict_loading:
            raise UserError(f"the checkpoint does not fit this model ({problems}): it was trained with "
                                  f"another model, model_kwargs, class count (--data.num_classes / the data) "
                                  f"or EMA setting; pass the settings it was trained with, or to start from "
                                  f"its weights use --model.init_from FILE (and --model.init_from_ignore_head "
                                  f"true for a new classifier)")

    def lr_scale(self) -> float:
        """global batch / base_batch_size (1 if scale_lr is off or the batch size is unknown)."""
        if not self.hparams.scale_lr:
            return 1.0
        batch = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if batch is None:
            rank_zero_warn("lr not scaled: the batch size is unknown (no datamodule with a batch_size)")
            return 1.0
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches / self.hparams.base_batch_size

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr * self.lr_scale(),
                                betas=tuple(hp.betas), eps=hp.eps)
        # The schedule's length is set in on_train_start. Here, before a resumed run's state is restored,
        # asking for it (trainer.estimated_stepping_batches) would start the training loader's workers
        # at epoch 0's order, which they would then serve as the resumed epoch's first batches.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))

    # --- training ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup_fn is not None and x.size(0) > 1:
            if x.size(0) % 2:  # timm's Mixup pairs samples: an odd batch drops its last image (warned at start)
                x, y = x[:-1], y[:-1]
            x, target = self.mixup_fn(x, y)
            loss = self.train_loss(self(x).float(), target)
        else:
            loss = F.cross_entropy(self(x).float(), y, label_smoothing=self.hparams.label_smoothing)
        finite = bool(torch.isfinite(loss))
        # decided by all processes together: one rank stopping alone left the others in a collective,
        # to fail with a connection error (gloo) or wait for the timeout (NCCL)
        trainer = self._trainer  # None when called outside a Trainer
        if not (trainer.strategy.reduce_boolean_decision(finite, all=True) if trainer else finite):
            # stop before the optimizer step writes NaNs into the weights; the checkpoints on disk are the
            # last good ones (see biformer_lit.reliability)
            where = f"({loss.item()})" if not finite else "on another process"
            raise UserError(f"non-finite training loss {where} at global step {self.global_step}, "
                                     f"epoch {self.current_epoch}, batch {batch_idx}: stopping; the last good "
                                     f"checkpoint is kept (--ckpt_path last resumes it with its own settings; "
                                     f"for a lower lr start a new run from its weights: --model.init_from FILE "
                                     f"--model.lr ...)")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True,
                 batch_size=x.size(0))
        # the lr this step uses (the scheduler steps after the optimizer)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 rank_zero_only=True, batch_size=x.size(0))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimizer step, so accumulation doesn't change the EMA horizon
            self.ema.update(self.model)  # constant decay from the initial weights, as DeiT's ModelEma

    def on_train_start(self) -> None:
        # After a resumed run's state is restored (it holds the scheduler's step): aim the schedule and the
        # lr of this step at this run's settings. The lr scales with this run's global batch, the length
        # is this run's (another batch size or more epochs than the checkpoint's run change them).
        hp, trainer = self.hparams, self.trainer
        sched = self.lr_schedulers()
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        if not math.isfinite(trainer.estimated_stepping_batches):
            raise UserError("trainer.max_epochs=-1 with no max_steps: the warmup + cosine schedule needs a known "
                            "length; allowed: a positive max_epochs, or max_steps")
        total = max(1, int(trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps
        if warmup is None:
            batches = trainer.num_training_batches
            per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
            warmup = round(hp.warmup_epochs * per_epoch)
        if warmup >= total:  # the clamp below would leave no decay at all: say so
            rank_zero_warn(f"warmup ({warmup} steps) covers the whole run ({total} steps): the lr never decays "
                           f"to min_lr; lower warmup_epochs / warmup_steps or train longer")
        warmup = max(0, min(int(warmup), total))
        scale = self.lr_scale()
        base = hp.lr * scale
        if sched.last_epoch > 0 and any(not math.isclose(b, base) for b in sched.base_lrs):
            rank_zero_warn(f"resumed with another global batch: base lr {sched.base_lrs[0]:.3g} -> {base:.3g}; "
                           f"the schedule's length counts every epoch at the new batch size")
        rank_zero_info(f"lr {base:.3g} = {hp.lr:g} x {scale:g} (global batch / {hp.base_batch_size}); "
                       f"min_lr {hp.min_lr * scale:.3g}; {warmup} warmup of {total} steps")
        sched.base_lrs = [base] * len(sched.base_lrs)
        sched.lr_lambdas = [warmup_cosine(warmup, total, hp.min_lr / hp.lr)] * len(sched.base_lrs)
        for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(sched.last_epoch)

    def on_fit_start(self) -> None:
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if self.mixup_fn is not None and batch is not None and batch % 2:
            rank_zero_warn(f"batch_size={batch} is odd: Mixup/CutMix pair images, so every training batch drops "
                           f"its last image; use an even batch size")
        if self.device.type == "cpu" and any(getattr(m, "backend", None) == "flex" for m in self.model.modules()):
            # it would fail at the first backward, after the model summary, with a traceback
            raise UserError("attn_backend='flex' cannot train on the CPU (FlexAttention has no CPU backward); "
                            "allowed there: auto, indexed, masked, gather")

    def on_train_epoch_end(self) -> None:
        # --data.skip_corrupt: say how many unreadable images this epoch passed over (the count is cumulative)
        dm = getattr(self.trainer, "datamodule", None)
        total = getattr(dm, "skipped", 0) or 0
        if total > self._skipped_seen:
            rank_zero_warn(f"epoch {self.current_epoch}: {total - self._skipped_seen} unreadable image(s) skipped "
                           f"(--data.skip_corrupt; {total} so far)")
            self.log("data/skipped_images", float(total), rank_zero_only=True)
        self._skipped_seen = total

    # --- evaluation ----------------------------------------------------------------------------------
    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x).float()
        self.eval_loss[stage].update(F.cross_entropy(logits, y, reduction="none"))
        self.metrics[stage].update(logits, y)
        if stage == "val" and self.ema is not None:
            self.metrics["val_ema"].update(self.ema.module(x).float(), y)

    def _log_accuracy(self, stage: str) -> None:
        # compute() gathers the states of all processes, so these are over the whole set
        for name, value in self.metrics[stage].compute().items():
            self.log(f"{stage}/{name}", value * 100.0, sync_dist=True)
        self.metrics[stage].reset()
        if stage in self.eval_loss:
            self.log(f"{stage}/loss", self.eval_loss[stage].compute(), sync_dist=True)
            self.eval_loss[stage].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")
        if self.ema is not None:
            self._log_accuracy("val_ema")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).float().softmax(dim=-1)
