"""What keeps long runs alive and reproducible (the CLI adds EpochSeed; the module attaches PreemptionCheckpoint).

- EpochSeed (the CLI adds it; switchable): every training epoch reseeds python/numpy/torch from (seed, epoch,
  rank). An epoch's randomness (drop path, Mixup/CutMix) then does not depend on what ran before it, so a
  run resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would (the data order
  and augmentation are functions of (seed, epoch) too: see data.sampler).
- PreemptionCheckpoint: on SIGTERM (what SLURM sends before preemption or at the time limit),
  Lightning stops after the current batch; this writes last.ckpt first, so the same command with
  `--ckpt_path last` (or a requeued SLURM job) continues. SIGKILL can't be caught: the run resumes
  from the last epoch-end last.ckpt, which is written atomically (biformer_lit.checkpoint).
  Under SLURM the time-limit warning (`#SBATCH --signal=SIGUSR1@120`) does the same, then requeues
  the job. This replaces Lightning's auto-requeue, whose hpc_ckpt_N.ckpt in the working directory any
  later run there without --ckpt_path (another experiment, another ablation arm, a `validate`) would
  silently resume from.
- Non-finite loss stops the run in ClassificationModule.training_step before the optimizer step.
"""
import os
import random
import signal
import subprocess

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**32


class EpochSeed(L.Callback):
    """Reseed python / numpy / torch at every training epoch from (seed, epoch, rank). On by default (the CLI's
    `epoch_seed` group); `--epoch_seed.enabled false` leaves the global generators alone, and a run resumed from
    an epoch-end checkpoint then draws other drop-path / Mixup randomness than the uninterrupted run."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.enabled:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))  # set by seed_everything
        s = epoch_seed(seed, trainer.current_epoch, trainer.global_rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


def last_checkpoint_path(trainer) -> str:
    """Where `--ckpt_path last` looks: the folder of the checkpoint callback without a monitor."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is None and cb.dirpath:
            return os.path.join(cb.dirpath, "last" + cb.FILE_EXTENSION)
    folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
    return os.path.join(folder, "last.ckpt")


def rewind_validation(checkpoint: dict) -> None:
    """Make a checkpoint saved part-way through fit's validation resume *before* it. Lightning resumes
    such a file as "validation done" (the training batches are complete), so that epoch's val/top1 and
    best checkpoint would never exist; one batch started and none processed reads as an evaluation to
    restart, and with nothing processed it restarts at the first validation batch."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    before = progress["total"]["completed"] - progress["current"]["completed"]  # batches of earlier epochs
    progress["total"] = dict(ready=before + 1, started=before + 1, processed=before, completed=before)
    progress["current"] = dict(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False


def slurm_job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


class PreemptionCheckpoint(L.Callback):
    _mid_validation = False
    _requeue = False
    _previous_sigusr1 = None

    def setup(self, trainer, pl_module, stage):
        # installed before Lightning registers its handlers, which then leaves SIGUSR1 to this one (also
        # outside fit: Lightning's would write an hpc_ckpt there; validate / test / predict just go on)
        if SLURMEnvironment.detect():
            self._requeue = False
            handler = self._on_requeue_signal if stage == "fit" else signal.SIG_IGN
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, handler)

    def teardown(self, trainer, pl_module, stage):
        self._restore_sigusr1()

    def _restore_sigusr1(self):
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    def _on_requeue_signal(self, signum, frame):
        if not self._requeue:  # SLURM may signal every process of the step: act once
            self._requeue = True
            signal.raise_signal(signal.SIGTERM)  # stop after the batch in flight, as a pre-emption

    def on_exception(self, trainer, pl_module, exception):
        self._restore_sigusr1()  # Lightning skips teardown after an exception
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            path = last_checkpoint_path(trainer)
            self._mid_validation = trainer.validating and not trainer.sanity_checking
            try:
                trainer.save_checkpoint(path)  # collective in DDP: every rank is here
            finally:
                self._mid_validation = False
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; "
                           f"run the same command with --ckpt_path last to continue")
            if self._requeue and trainer.is_global_zero:  # after the save: requeueing ends this job
                job = slurm_job_id()
                try:
                    code = subprocess.call(["scontrol", "requeue", job])
                except OSError as e:  # no scontrol on this node
                    code = e
                rank_zero_info(f"SLURM job {job} requeued" if code == 0 else
                               f"`scontrol requeue {job}` failed ({code}): resubmit the job to continue")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._mid_validation:
            rewind_validation(checkpoint)


def hpc_checkpoints(default_root_dir) -> list:
    """The hpc_ckpt_*.ckpt files (Lightning's SLURM checkpoints) in a run's root folder (default: here)."""
    folder = default_root_dir or os.getcwd()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith("hpc_ckpt_") and f.endswith(".ckpt"))


def foreign_hpc_checkpoints(default_root_dir) -> list:
    """hpc_ckpt_*.ckpt files Lightning would resume a SLURM run from when no --ckpt_path is given."""
    return hpc_checkpoints(default_root_dir) if SLURMEnvironment.detect() else []
