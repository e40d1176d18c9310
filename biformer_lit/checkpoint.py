"""Checkpoint files: atomic writing, and reading weights to initialise a model from.

AtomicCheckpointIO: Lightning writes `last.ckpt` in place; a kill (SLURM pre-emption, OOM killer,
Ctrl-C) during the write leaves a truncated file that `--ckpt_path last` then fails to load. Here
the checkpoint goes to a temporary file in the same directory (same filesystem, so the rename is
atomic), is fsynced, and replaces the old file with os.replace: a reader sees the old or the new
checkpoint, never half of one. A temp file left by a killed write is removed at the next write of that
checkpoint; a full or read-only disk is an OSError naming the checkpoint (the previous one is kept).

Loading uses weights_only=True: our checkpoints hold only tensors and plain Python types (hyper-
parameters are plain: strings, numbers, lists, dicts; the LR schedule is a closure, which LambdaLR
does not serialise; ModelCheckpoint stores its scores as tensors and its paths as str), so the safe
unpickler reads them and a checkpoint from elsewhere cannot run code on load. A checkpoint that does
hold other objects (e.g. hyperparameters of a custom class) fails to load with a message naming the
type; for a file you trust, `--weights_only false` (a Trainer.fit/validate argument) loads it anyway.
"""
import glob
import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict, Optional, Set

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from .errors import UserError, storage_oserror

__all__ = ["AtomicCheckpointIO", "load_checkpoint_file", "check_resume_checkpoint", "state_dict_mismatches",
           "read_state_dict", "load_init_weights"]

class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes via temp file + fsync + os.replace; loads with weights_only=True."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(os.path.basename(path))}.*.tmp")):
            os.unlink(stale)  # a full-size leftover of a write that was killed
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private (0600); use the usual mode
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            full = storage_oserror(e)  # name the checkpoint (the OSError names none, or torch hides it)
            if full is not None:
                kept = " (the previous checkpoint is kept)" if os.path.exists(path) else ""
                raise OSError(full.errno, f"{full.strerror}{kept}", path) from e
            raise
        try:  # make the rename itself durable (the directory entry); not possible on every OS/filesystem
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        # None (Lightning's default) means "as torch decides"; we ask for the safe loader explicitly.
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def load_checkpoint_file(path, weights_only: bool = True, mmap: bool = False, trust_hint: str = "") -> Any:
    """torch.load on the CPU, every way a file can be unusable turned into a one-line UserError.
    mmap: map tensor data instead of reading it (a check of a large checkpoint costs no memory);
    trust_hint: how to load a file holding pickled objects anyway (the command's option)."""
    path = os.fspath(path)
    if os.path.isdir(path):  # it said "not found"
        raise UserError(f"{path} is a folder; allowed: a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    unreadable = f"{path}: not a readable PyTorch checkpoint (corrupt, truncated, or another kind of file)"
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # only torch.save's zip format can be mapped
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:  # whatever torch.load raises on this file is about the file
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            # a real checkpoint holding pickled Python objects beyond tensors and plain values: refused
            # rather than run on load
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise UserError(f"{path}: holds more than tensors and plain values (pickled "
                            f"{', '.join(unsafe[:2]) or 'objects of unknown type'}); refused by the safe loader "
                            f"(weights_only){trust_hint}") from None
        # not a zip archive (torch.save writes those): the unpickler's message would only mislead
        detail = "" if isinstance(e, pickle.UnpicklingError) else f" ({type(e).__name__}: {str(e)[:80]})"
        raise UserError(unreadable + detail) from None


def check_resume_checkpoint(path, weights_only: bool = True, instead: str = "--model.init_from FILE",
                            trust_hint: str = "") -> dict:
    """`--ckpt_path FILE`: a Lightning training checkpoint, readable (UserError otherwise);
    `instead` names the option that takes a plain weights file. Returns it, tensors memory-mapped."""
    ckpt = load_checkpoint_file(path, weights_only, mmap=True, trust_hint=trust_hint)  # Lightning reads it again
    if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning training checkpoint (no training state); "
                              f"for a file of weights use {instead.replace('FILE', str(path))}")
    return ckpt


def state_dict_mismatches(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
                          ignore: Set[str] = frozenset()) -> str:
    """'' if `sd` loads into a model whose state dict is `own`, else what does not fit."""
    # checkpoints saved before BatchNorm counted batches lack num_batches_tracked: harmless
    missing = {k for k in own.keys() - sd.keys() if not k.endswith("num_batches_tracked")} - ignore
    unexpected = sd.keys() - own.keys()
    shapes = {f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd.keys() & own.keys()
              if isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape}
    return "; ".join(f"{what}: {_listing(keys)}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The model weights in `path`: a Lightning .ckpt (`state_dict`, keys under `model.`), the original
    BiFormer release format (`{"model": state_dict}`), or a bare state dict."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if isinstance(ckpt.get("state_dict"), dict):  # Lightning
        sd = ckpt["state_dict"]
        if any(k.startswith("model.") for k in sd):  # ClassificationModule: model.* (ema.* is skipped)
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    elif isinstance(ckpt.get("model"), dict):  # original release format
        sd = ckpt["model"]
    else:
        sd = ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: no state dict found (expected a Lightning checkpoint, "
                              f"{{'model': state_dict}} or a state dict of tensors)")
    return sd


def _classifier_keys(model: nn.Module) -> Set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefix = next((n for n, m in model.named_modules() if m is head and n), None)
    return {f"{prefix}.{n}" for n, _ in head.named_parameters()} if prefix else set()


def _listing(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_init_weights(model: nn.Module, path: str, ignore_head: bool = False,
                      hint: str = "check --model.model and --model.model_kwargs",
                      sd: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Initialise `model` from `path` (see read_state_dict; `sd`: its state dict when already read);
    every mismatch is a UserError (`hint` ends the message for parameters that do not fit)."""
    sd = read_state_dict(path) if sd is None else sd
    from .models import BiFormer, convert_state_dict  # local: keeps this module light to import
    if isinstance(model, BiFormer):  # the load pre-hook would rename too; the checks below need our names
        sd = convert_state_dict(sd)
    head_keys = _classifier_keys(model)
    own = model.state_dict()
    if ignore_head:
        sd = {k: v for k, v in sd.items() if k not in head_keys}
    else:
        for key in sorted(head_keys):
            if key.endswith("weight") and key in sd and sd[key].shape[0] != own[key].shape[0]:
                raise UserError(
                    f"{path}: the checkpoint's classifier ({key}) has {sd[key].shape[0]} classes but the model has "
                    f"{own[key].shape[0]} (from the data); use matching data, or "
                    f"--model.init_from_ignore_head=true to start a new classifier")
    problems = state_dict_mismatches(sd, own, ignore=head_keys if ignore_head else set())
    if problems:
        raise UserError(f"{path} does not fit model {type(model).__name__} ({problems}); {hint}")
    model.load_state_dict(sd, strict=False)
